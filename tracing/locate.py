"""Locate where a model stores facts: average tracing over known facts, then pick MEMIT's layers.

    python -m tracing.locate                     # embedded model, 40 known facts, MLP kind
    python -m tracing.locate gpt2-xl --facts 200 --kinds all --figures out/

The chosen layers are written to the cache (``<cache>/critical_layers/<model>.json``), where
:func:`critical_layers_for` finds them; ``editing`` takes them as MEMIT's default layers. The result for
the embedded model also ships with the package (``tracing/data/critical_layers_smollm2.json``), so a
fresh install edits the layers tracing found without re-running it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tracing.adapter import KINDS
from tracing.average import (SELECTION_METHODS, AverageEffect, CriticalLayers, average_indirect_effect,
                             choose_critical_layers, trace_facts)
from tracing.causal_trace import FactTrace, TraceConfig
from tracing.facts import DATA_DIR, Fact, known_facts, load_facts, spread
from tracing.io import write_json_atomic
from tracing.models import EMBEDDED_MODEL, ModelUnavailableError, UnknownModelError, cache_dir, model_spec


@dataclass
class Localisation:
    """Average effects per kind and the critical MLP layers chosen from them."""

    effects: dict[str, AverageEffect]
    critical: CriticalLayers
    traces: list[FactTrace]


def locate(model, facts: list[Fact], config: TraceConfig = TraceConfig(kinds=("mlp",)), size: int = 5,
           method: str = "peak-end", only_correct: bool = True) -> Localisation:
    """Trace ``facts`` and choose ``size`` critical MLP layers (the MLP kind is always traced).

    As in ROME, facts the model gets wrong are left out of the averages unless ``only_correct=False``."""
    if "mlp" not in config.kinds:
        config = dataclasses.replace(config, kinds=(*config.kinds, "mlp"))
    traces = trace_facts(model, facts, config)
    effects = {kind: average_indirect_effect(traces, kind, only_correct) for kind in config.kinds}
    return Localisation(effects, choose_critical_layers(effects["mlp"], size, method), traces)


def _critical_path(model_name: str) -> Path:
    return cache_dir() / "critical_layers" / f"{model_name.replace('/', '__')}.json"


def _packaged_path(model_name: str) -> Path:
    return DATA_DIR / f"critical_layers_{model_name.replace('/', '__')}.json"


def save_critical_layers(critical: CriticalLayers, model_name: str, path: Path | None = None) -> Path:
    path = path or _critical_path(model_name)
    write_json_atomic(path, {"model": model_name, **dataclasses.asdict(critical)})
    return path


def critical_layers_for(model) -> tuple[int, ...] | None:
    """Layers found by tracing for this model (cache first, then the packaged result, then the paper's)."""
    spec = model_spec(model)
    for path in (_critical_path(spec.name), _packaged_path(spec.name)):
        if path.is_file():
            return tuple(json.loads(path.read_text())["layers"])
    return spec.paper_layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracing.locate", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=EMBEDDED_MODEL)
    parser.add_argument("--facts", type=int, default=40, help="how many known facts to trace (default 40)")
    parser.add_argument("--facts-file", default=None, help="CounterFact/zsRE JSON instead of the bundled facts")
    parser.add_argument("--kinds", default="mlp", help="comma-separated kinds, or 'all' (mlp is always traced)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--size", type=int, default=5, help="number of critical layers (default 5)")
    parser.add_argument("--method", choices=SELECTION_METHODS, default="peak-end")
    parser.add_argument("--figures", default=None, help="folder for the average-effect and layer figures")
    parser.add_argument("--include-wrong", action="store_true",
                        help="average over facts the model gets wrong too (ROME leaves them out)")
    parser.add_argument("--save-package", action="store_true",
                        help="also write the result into tracing/data (maintainers, for the embedded model)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from tracing.models import load_model

    kinds = KINDS if args.kinds == "all" else tuple(k.strip() for k in args.kinds.split(","))
    try:
        model = load_model(args.model, device=args.device)
        config = TraceConfig(kinds=kinds, samples=args.samples)
    except (UnknownModelError, ModelUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    facts = load_facts(args.facts_file) if args.facts_file else known_facts()
    try:
        result = locate(model, spread(facts, args.facts), config, args.size, args.method, not args.include_wrong)
    except ValueError as error:  # e.g. the model gets none of the facts right
        print(f"error: {error}", file=sys.stderr)
        return 2

    name = model_spec(model).name
    print(f"{result.effects['mlp'].n_facts} of {min(args.facts, len(facts))} facts predicted correctly")
    for kind, effect in result.effects.items():
        curve = effect.role("last subject token")
        print(f"{kind:>5} AIE at last subject token, by layer: " + " ".join(f"{v:.2f}" for v in curve))
    critical = result.critical
    print(f"critical MLP layers ({critical.method}): {list(critical.layers)} (peak at layer {critical.peak})")
    print(f"saved to {save_critical_layers(critical, name)}")
    if args.save_package:
        print(f"saved to {save_critical_layers(critical, name, _packaged_path(name))}")
    if args.figures:
        from tracing.plot import plot_average_effect, plot_critical_layers, save_figure

        folder = Path(args.figures)
        print(save_figure(plot_average_effect(list(result.effects.values())), folder / f"average_{name}.png"))
        print(save_figure(plot_critical_layers(critical), folder / f"critical_layers_{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
