"""Does tracing choose the right layers? Edit the same facts with MEMIT at several candidate layer bands and
put each band's CounterFact scores beside its causal-tracing effect.

    python -m editing.compare_bands [MODEL] -n 20 [--bands critical,first,mid,random] [--band-width W]
                                    [--seed S] [--out-dir DIR]

The N facts are traced first (:func:`tracing.locate.locate`: the MLP's average indirect effect at the last
subject token, for windows of layers and for one layer at a time), then edited at each band in turn; every
edit is undone before the next, so each band starts from the unedited model. All bands have one width W
(default: the critical band's):

- ``critical``: the layers MEMIT edits by default (:func:`tracing.layer_set.critical_layers_for`: the cached
  trace, the packaged one, the paper's); where none is known, or its width is not W, the band this run's
  trace chooses (peak-end, as ``python -m tracing.locate``).
- ``first``: layers 0 .. W-1, the band holding MLP layer 0.
- ``mid``: a paper-shaped band centred at a third of the depth (GPT-2 XL's 13-17 of 48 is centred on 15).
- ``random``: a contiguous band whose start is drawn with ``--seed``.

Writes ``compare_bands.md`` (the printed table: band, layers, mean single-layer AIE, mean windowed AIE, ES, PS,
NS, the unedited model first), ``compare_bands.json`` and ``compare_bands.png`` (the AIE curves with the bands
shaded, and ES/PS/NS bars per band).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from tracing import cli

if TYPE_CHECKING:
    from editing.memit import MemitConfig
    from tracing.causal_trace import TraceConfig
    from tracing.facts import Fact

BAND_NAMES = ("critical", "first", "mid", "random")
METRICS = ("ES", "PS", "NS")


# --- the candidate bands (pure arithmetic, no model) ---------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """A band of MLP layers MEMIT writes into, and where it came from."""

    name: str
    layers: tuple[int, ...]
    detail: str = ""

    @property
    def span(self) -> str:
        """``3–8`` for a contiguous band, else the layers listed."""
        layers = self.layers
        if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
            return f"{layers[0]}–{layers[-1]}"
        return ",".join(str(layer) for layer in layers)


def _check_width(n_layers: int, width: int) -> None:
    if not 1 <= width <= n_layers:
        raise ValueError(f"band width {width} does not fit a {n_layers}-layer model (1 to {n_layers})")


def first_band(n_layers: int, width: int) -> tuple[int, ...]:
    """Layers 0 .. width-1."""
    _check_width(n_layers, width)
    return tuple(range(width))


def mid_band(n_layers: int, width: int) -> tuple[int, ...]:
    """``width`` layers centred at a third of the depth (kept inside the model)."""
    _check_width(n_layers, width)
    start = min(max(0, round(n_layers / 3 - (width - 1) / 2)), n_layers - width)
    return tuple(range(start, start + width))


def random_band(n_layers: int, width: int, seed: int) -> tuple[int, ...]:
    """``width`` contiguous layers starting where ``seed`` draws (the same band for the same seed)."""
    _check_width(n_layers, width)
    start = random.Random(seed).randrange(n_layers - width + 1)
    return tuple(range(start, start + width))


def candidate_bands(names: Sequence[str], n_layers: int, critical: Band, seed: int) -> list[Band]:
    """The bands ``names`` asks for, all of the critical band's width, in the order asked."""
    width = len(critical.layers)
    made = {
        "critical": lambda: critical,
        "first": lambda: Band("first", first_band(n_layers, width), "starts at MLP layer 0"),
        "mid": lambda: Band("mid", mid_band(n_layers, width), "centred at a third of the depth"),
        "random": lambda: Band("random", random_band(n_layers, width, seed), f"seed {seed}"),
    }
    unknown = [name for name in names if name not in made]
    if unknown:
        raise ValueError(f"unknown band {unknown[0]!r}; expected some of {BAND_NAMES}")
    return [made[name]() for name in names]


# --- the comparison ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandResult:
    """One band's mean AIE over its layers and the CounterFact scores after editing there."""

    band: Band
    single_layer_aie: float
    windowed_aie: float
    scores: dict  # CounterFactSummary.as_dict()


@dataclass(frozen=True)
class BandComparison:
    """Every band's result on the same facts, the unedited model's scores and the AIE curves behind them."""

    model: str
    n_edits: int
    n_traced: int  # facts behind the AIE (those predicted correctly, unless wrong ones were included)
    window: int
    windowed_curve: tuple[float, ...]
    single_layer_curve: tuple[float, ...]
    unedited: dict
    results: tuple[BandResult, ...]

    def table(self) -> str:
        """Markdown: band | layers | mean single-layer AIE | mean windowed AIE | ES | PS | NS, unedited first."""
        from editing.evaluate import markdown_table

        columns = ["layers", "mean single-layer AIE", f"mean windowed AIE (window {self.window})", *METRICS]
        rows = {"unedited": {"layers": "–", **{m: self.unedited[m] for m in METRICS}}}
        for result in self.results:
            rows[result.band.name] = {"layers": result.band.span, columns[1]: f"{result.single_layer_aie:.3f}",
                                      columns[2]: f"{result.windowed_aie:.3f}",
                                      **{m: result.scores[m] for m in METRICS}}
        return markdown_table(rows, columns, corner="band")

    def as_record(self) -> dict:
        record = dataclasses.asdict(self)
        record["results"] = [dataclasses.asdict(r) | {"band": dataclasses.asdict(r.band) | {"layers": list(r.band.layers)}}
                             for r in self.results]
        return record


def critical_band(model, traced_choice: tuple[int, ...], width: int) -> Band:
    """MEMIT's default layers for ``model`` if they are ``width`` wide, else this run's trace's choice."""
    from tracing.layer_set import critical_layers_for

    known = critical_layers_for(model)
    if known is not None and len(known) == width:
        return Band("critical", known.layers, f"{known.source}: {known.detail}".rstrip(": "))
    why = "none known" if known is None else f"the known band {list(known.layers)} is {len(known)} wide"
    return Band("critical", traced_choice, f"traced in this run ({why})")


def default_width(model) -> int:
    """The width of MEMIT's default band for ``model``, else 5 (or every layer of a smaller model)."""
    from tracing.adapter import ModelAdapter
    from tracing.layer_set import critical_layers_for

    known = critical_layers_for(model)
    return len(known) if known is not None else min(5, ModelAdapter.of(model).n_layers)


def compare_bands(model, facts: Sequence[Fact], names: Sequence[str] = BAND_NAMES, width: int | None = None,
                  seed: int = 0, memit: MemitConfig | None = None, trace: TraceConfig | None = None,
                  only_correct: bool = True) -> BandComparison:
    """Trace ``facts``, then edit them with MEMIT at each band of ``names`` and score ES/PS/NS.

    ``memit``'s layers are replaced by each band's; the weights are the unedited ones again afterwards.
    Bad bands (a width that does not fit) and facts that cannot be edited are refused before any work."""
    from editing.evaluate import evaluate_counterfact
    from editing.memit import MemitConfig, apply_memit
    from editing.requests import validate_requests
    from tracing.adapter import ModelAdapter
    from tracing.causal_trace import TraceConfig
    from tracing.layer_set import LayerSet
    from tracing.locate import locate
    from tracing.models import model_spec

    memit = memit or MemitConfig(show_progress=False)
    trace = trace or TraceConfig(kinds=("mlp",), show_progress=False)
    n_layers = ModelAdapter.of(model).n_layers
    width = width or default_width(model)
    _check_width(n_layers, width)
    facts = validate_requests(model, facts)
    unknown = [name for name in names if name not in BAND_NAMES]
    if unknown or not names:
        raise ValueError(f"bands must be some of {BAND_NAMES}, got {list(names)}")

    located = locate(model, list(facts), trace, size=width, only_correct=only_correct)
    windowed, single = located.windowed_curve, located.single_layer_curve
    bands = candidate_bands(names, n_layers, critical_band(model, located.critical.layers, width), seed)
    unedited = evaluate_counterfact(model, facts).as_dict()
    results = []
    for band in bands:
        config = dataclasses.replace(memit, layers=LayerSet(band.layers, "given", f"band {band.name}"))
        edit = apply_memit(model, facts, config)
        try:
            scores = evaluate_counterfact(model, facts).as_dict()
        finally:
            edit.undo(model)
        layers = list(band.layers)
        results.append(BandResult(band, float(single[layers].mean()), float(windowed[layers].mean()), scores))
    return BandComparison(model_spec(model).name, len(facts), located.effects["mlp"].n_facts,
                          located.effects["mlp"].window, tuple(float(v) for v in windowed),
                          tuple(float(v) for v in single), unedited, tuple(results))


def plot_band_comparison(comparison: BandComparison):
    """Left: the MLP AIE curves at the last subject token, each band shaded in its own lane below them (the
    critical band also behind the curves). Right: ES/PS/NS of the unedited model and after each band's edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tracing.plot import STYLE

    colours = {result.band.name: f"C{i}" for i, result in enumerate(comparison.results)}
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(9.0, 3.6))
        grid = fig.add_gridspec(2, 2, height_ratios=[3, 0.3 + 0.3 * len(comparison.results)], width_ratios=[1.4, 1])
        curves = fig.add_subplot(grid[0, 0])
        lanes = fig.add_subplot(grid[1, 0], sharex=curves)
        bars = fig.add_subplot(grid[:, 1])
        layers = np.arange(len(comparison.windowed_curve))
        for i, result in enumerate(comparison.results):
            colour = colours[result.band.name]
            lanes.broken_barh([(layer - 0.5, 1.0) for layer in result.band.layers], (i - 0.4, 0.8), color=colour,
                              alpha=0.6)
            if result.band.name == "critical":
                for layer in result.band.layers:
                    curves.axvspan(layer - 0.5, layer + 0.5, color=colour, alpha=0.12, linewidth=0)
        curves.plot(layers, comparison.windowed_curve, color="#1b7837", marker="o", markersize=3,
                    label=f"window of {comparison.window}")
        curves.plot(layers, comparison.single_layer_curve, color="#762a83", marker="s", markersize=3,
                    linestyle="--", label="one layer")
        curves.set_ylabel("avg. indirect effect")
        curves.set_title(f"MLP effect at the last subject token ({comparison.n_traced} facts)", fontsize=9)
        curves.legend(frameon=False, fontsize=7)
        curves.tick_params(labelbottom=False)
        lanes.set_yticks(range(len(comparison.results)),
                         [f"{r.band.name} {r.band.span}" for r in comparison.results], fontsize=7)
        lanes.set_ylim(len(comparison.results) - 0.5, -0.5)
        lanes.set_xlim(-0.5, len(layers) - 0.5)
        lanes.set_xlabel("MLP layer (centre of the window, or the one layer)")
        rows = [("unedited", comparison.unedited, "0.6")]
        rows += [(r.band.name, r.scores, colours[r.band.name]) for r in comparison.results]
        x = np.arange(len(METRICS))
        bar_width = 0.8 / len(rows)
        for i, (name, scores, colour) in enumerate(rows):
            heights = [np.nan if scores.get(m) is None else scores[m] for m in METRICS]
            bars.bar(x + (i - (len(rows) - 1) / 2) * bar_width, heights, width=bar_width, color=colour, label=name)
        bars.set_xticks(x, METRICS)
        bars.set_ylim(0, 1.02)
        bars.set_title(f"MEMIT, {comparison.n_edits} facts, per band", fontsize=9)
        bars.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows))
        fig.suptitle(f"Does tracing choose the right layers? {comparison.model}", fontsize=10)
        fig.tight_layout()
    return fig


# --- command line ---------------------------------------------------------------------------------------------


def band_list(value: str) -> tuple[str, ...]:
    """Comma-separated band names from :data:`BAND_NAMES` (repeats dropped), or ``all``."""
    return cli.choice_list(value, BAND_NAMES, "bands")


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m editing.compare_bands",
        description="Does tracing choose the right layers? Trace N facts, edit them with MEMIT at several "
                    "candidate bands of MLP layers (tracing's choice, the band from layer 0, a paper-shaped mid "
                    "band, a random band) and print ES/PS/NS per band beside the band's mean AIE. Writes "
                    "compare_bands.md, .json and .png.")
    parser.add_argument("model", nargs="?", default=cli.DEFAULT_MODEL, type=cli.text,
                        help=f"model name or folder (default: the embedded {cli.DEFAULT_MODEL})")
    parser.add_argument("-n", "--n-edits", type=cli.int_at_least(1), default=10,
                        help="how many facts to trace and edit, one per subject (default 10)")
    parser.add_argument("--facts", default=None, type=cli.facts_source,
                        help="a dataset name or CounterFact-style JSON file (default: the bundled known facts)")
    parser.add_argument("--bands", default=BAND_NAMES, type=band_list,
                        help="comma-separated bands from critical, first, mid, random, or 'all' (default all)")
    parser.add_argument("--band-width", type=cli.int_at_least(1), default=None,
                        help="layers per band (default: the width of MEMIT's default band, else 5)")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=0, help="seed of the random band (default 0)")
    parser.add_argument("--samples", type=cli.int_at_least(1), default=10,
                        help="noise samples per traced cell (default 10)")
    parser.add_argument("--include-wrong", action="store_true",
                        help="average the AIE over facts the model gets wrong too (ROME leaves them out)")
    parser.add_argument("--mom2-weight", type=cli.float_above(0, inclusive=False), default=None,
                        help="MEMIT's λ (default: GPT-J's 15000 scaled by d_mlp)")
    parser.add_argument("--corpus", default="model", type=cli.corpus_source,
                        help="C0 corpus: 'model', a text file or folder, or hf:<dataset>[:<config>] (default: model)")
    parser.add_argument("--corpus-samples", type=cli.int_at_least(1), default=1000,
                        help="texts in the C0 corpus (default 1000)")
    parser.add_argument("--out-dir", default="out/compare_bands", type=cli.output_folder,
                        help="where compare_bands.md, .json and .png are written (default out/compare_bands)")
    parser.add_argument("--device", default=None, type=cli.text, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cli.check_model_name(args.model)
    cli.check_device(args.device)
    from tracing.facts import one_per_subject, spread

    facts = spread(one_per_subject(cli.facts_from(args.facts)), args.n_edits)
    if len(facts) < args.n_edits:
        cli.fail(f"the facts hold {len(facts)} distinct subjects; -n {args.n_edits} is too many")
    if any(fact.target_new is None for fact in facts):
        cli.fail("some facts have no new target to edit")

    from editing.covariance import CorpusConfig
    from editing.memit import MemitConfig
    from editing.requests import EditRequestError
    from tracing.adapter import ModelAdapter
    from tracing.causal_trace import TraceConfig
    from tracing.io import write_json_atomic, write_text_atomic
    from tracing.models import ModelUnavailableError, UnknownModelError, load_model
    from tracing.plot import save_figure

    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=args.device)
    n_layers = ModelAdapter.of(model).n_layers
    if args.band_width is not None and args.band_width > n_layers:
        cli.fail(f"argument --band-width: {args.band_width} layers asked for, but {args.model} has {n_layers} layers")
    memit = MemitConfig(mom2_weight=args.mom2_weight, show_progress=False,
                        corpus=CorpusConfig(source=args.corpus, samples=args.corpus_samples))
    trace = TraceConfig(kinds=("mlp",), samples=args.samples, show_progress=True)
    with cli.user_errors(EditRequestError, ModelUnavailableError, ValueError):  # e.g. no fact predicted correctly
        comparison = compare_bands(model, facts, args.bands, args.band_width, args.seed, memit, trace,
                                   only_correct=not args.include_wrong)
    table = comparison.table()
    print(f"{comparison.model}: {comparison.n_edits} facts edited with MEMIT per band; AIE over "
          f"{comparison.n_traced} traced facts at the last subject token")
    for result in comparison.results:
        print(f"  {result.band.name}: layers {result.band.span} ({result.band.detail})")
    print(table)
    out = args.out_dir
    write_text_atomic(out / "compare_bands.md", table + "\n")
    write_json_atomic(out / "compare_bands.json", {
        **comparison.as_record(), "seed": args.seed, "samples": args.samples, "include_wrong": args.include_wrong,
        "memit": {"mom2_weight": args.mom2_weight, "corpus": args.corpus, "corpus_samples": args.corpus_samples},
        "facts": [fact.to_counterfact() for fact in facts],
    })
    save_figure(plot_band_comparison(comparison), out / "compare_bands.png")
    print(f"wrote {out / 'compare_bands'}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
