"""Locate where a model stores facts: average tracing over known facts, then pick MEMIT's layers.

    python -m tracing.locate                     # embedded model, 40 known facts, MLP kind
    python -m tracing.locate gpt2-xl --facts 200 --kinds all --figures out/
    python -m tracing.locate --trace-method atp --facts 200   # attribution patching as a fast first pass
    torchrun --nproc-per-node 4 -m tracing.locate --facts 400   # facts sharded over 4 processes

``locate()`` returns the chosen layers as a value (``result.layer_set``) that MEMIT takes directly; the
command line also writes them to the cache (``<cache>/critical_layers/<model>.json``), where
:func:`~tracing.layer_set.critical_layers_for` finds them as MEMIT's default layers. The result for
the embedded model also ships with the package (``tracing/data/critical_layers_smollm2.json``), so a
fresh install edits the layers tracing found without re-running it.

Under ``torchrun`` every process loads the model and traces its shard of the facts; the traces are
gathered (:func:`tracing.average.trace_facts`), so every rank holds the single-process result, and rank 0
alone prints and writes it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # answer --help and refuse bad arguments before the slow imports below (torch)
    from tracing.cli import locate_parser

    locate_parser().parse_args()

import numpy as np

from tracing.average import (AverageEffect, CriticalLayers, average_indirect_effect,
                             choose_critical_layers, trace_facts)
from tracing.causal_trace import FactTrace, TraceConfig
from tracing.facts import Fact, spread
from tracing.layer_set import LayerSet, packaged_path, save_critical_layers
from tracing.metrics import atp_space_label
from tracing.models import ModelUnavailableError, UnknownModelError, model_spec


@dataclass
class Localisation:
    """Average effects per kind and the critical MLP layers chosen from them.

    ``single_layer`` is the MLP effect of restoring *one* layer (window 1) at the last subject token, beside
    the windowed ``effects["mlp"]`` the layers are chosen from: a window of 10 spreads one layer's effect
    over the ten windows that contain it, so the windowed curve alone cannot say which layer carries it."""

    effects: dict[str, AverageEffect]
    critical: CriticalLayers
    traces: list[FactTrace]
    single_layer: AverageEffect | None = None

    @property
    def windowed_curve(self) -> np.ndarray:
        """AIE of the MLP window centred on each layer, at the last subject token."""
        return self.effects["mlp"].role("last subject token")

    @property
    def single_layer_curve(self) -> np.ndarray | None:
        """AIE of restoring each layer's MLP output alone, at the last subject token (None if not traced)."""
        return None if self.single_layer is None else self.single_layer.role("last subject token")

    @property
    def layer_set(self) -> LayerSet:
        """The critical layers as a value MEMIT takes (``MemitConfig(layers=result.layer_set)``)."""
        critical = self.critical
        return LayerSet(critical.layers, "traced", f"{critical.n_facts} facts, {critical.method}, peak {critical.peak}")


def locate(model, facts: list[Fact], config: TraceConfig = TraceConfig(kinds=("mlp",)), size: int = 5,
           method: str = "peak-end", only_correct: bool = True, single_layer: bool = True) -> Localisation:
    """Trace ``facts`` and choose ``size`` critical MLP layers (the MLP kind is always traced).

    As in ROME, facts the model gets wrong are left out of the averages unless ``only_correct=False``.
    With ``single_layer`` the MLP is also traced one layer at a time (window 1) at the last subject token
    only (a fraction of the full trace's cost); its curve is recorded beside the windowed one."""
    if "mlp" not in config.kinds:
        config = dataclasses.replace(config, kinds=(*config.kinds, "mlp"))
    traces = trace_facts(model, facts, config)
    effects = {kind: average_indirect_effect(traces, kind, only_correct) for kind in config.kinds}
    critical = choose_critical_layers(effects["mlp"], size, method)
    one_layer = None
    if single_layer:
        one_layer_config = dataclasses.replace(config, kinds=("mlp",), window=1, tokens="last subject")
        one_layer = average_indirect_effect(trace_facts(model, facts, one_layer_config), "mlp", only_correct)
        curve = one_layer.role("last subject token")
        critical = dataclasses.replace(critical, single_layer_curve=tuple(float(v) for v in curve))
    return Localisation(effects, critical, traces, one_layer)


def main(argv: list[str] | None = None) -> int:
    from tracing import cli
    from tracing.adapter import ModelAdapter
    from tracing.distributed import init_from_environment, local_device
    from tracing.models import load_model

    args = cli.locate_parser().parse_args(argv)
    cli.check_model_name(args.model)
    cli.check_device(args.device)
    facts = cli.facts_from(args.facts_file)
    cli.check_trace_choices(args)
    if args.metric == "logit_diff":
        missing = [f.subject for f in spread(facts, args.facts) if f.target_new is None]
        if missing:
            cli.fail(f"--metric logit_diff compares against each fact's target_new, and {len(missing)} fact(s) "
                     f"have none (first: {missing[0]!r})")
    current = init_from_environment()
    config = TraceConfig(kinds=args.kinds, samples=args.samples, show_progress=current.is_main,
                         method=args.trace_method, corruption=args.corruption, metric=args.metric,
                         fact_batch=args.fact_batch, atp_steps=args.atp_steps, atp_space=args.atp_space)
    device = args.device or (local_device() if current.size > 1 else None)
    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=device)
    n_layers = ModelAdapter.of(model).n_layers
    if args.size is not None and args.size > n_layers:
        cli.fail(f"argument --size: {args.size} critical layers asked for, but {args.model} has {n_layers} layers")
    size = args.size or min(5, n_layers)
    with cli.user_errors(ValueError):  # e.g. the model gets none of the facts right
        result = locate(model, spread(facts, args.facts), config, size, args.method, not args.include_wrong)
    if not current.is_main:
        return 0

    name = model_spec(model).name
    linear = atp_space_label(config.atp_space, config.metric)
    method = f"attribution patching (linear in {linear})" if config.method == "atp" else "exact tracing"
    print(f"traced by {method}, {config.corruption} corruption, metric {config.metric}")
    print(f"{result.effects['mlp'].n_facts} of {min(args.facts, len(facts))} facts predicted correctly")
    for kind, effect in result.effects.items():
        curve = effect.role("last subject token")
        print(f"{kind:>5} AIE at last subject token, by layer (window {effect.window}): "
              + " ".join(f"{v:.2f}" for v in curve))
    single = result.single_layer_curve
    print("  mlp AIE at last subject token, by layer (one layer restored): " + " ".join(f"{v:.3f}" for v in single))
    critical = result.critical
    print(f"critical MLP layers ({critical.method}): {list(critical.layers)} (peak at layer {critical.peak})")
    print(f"saved to {save_critical_layers(critical, name)}")
    if args.save_package:
        print(f"saved to {save_critical_layers(critical, name, packaged_path(name))}")
    if args.figures:
        from tracing.plot import plot_average_effect, plot_critical_layers, save_figure

        folder = args.figures
        how = f"{'AtP estimate' if config.method == 'atp' else 'exact'}, {config.corruption}, {config.metric}"
        title = f"Average indirect effect over {result.critical.n_facts} facts ({how})"
        print(save_figure(plot_average_effect(list(result.effects.values()), title), folder / f"average_{name}.png"))
        print(save_figure(plot_critical_layers(critical), folder / f"critical_layers_{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
