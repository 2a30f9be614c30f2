"""README figure: trace a fact before and after editing it, and a neighbouring fact, side by side.

    python -m figures.edit_then_trace --method memit [--out-dir docs]
    python -m figures.edit_then_trace --method wise

Before: the true answer on the unedited model. After: the new answer on the edited model. The
difference column shows where the new answer is read from: MEMIT's edited MLP layers at the subject, or
WISE's side-memory layer. The neighbour (same relation, another subject, its own answer) should not move.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tracing.causal_trace import TraceConfig, trace_fact
from tracing.facts import Fact, known_facts
from tracing.models import load_model
from tracing.plot import plot_trace_comparison, save_figure

DEFAULT_SUBJECT = "Germany"


def pick_facts(subject: str) -> tuple[Fact, Fact]:
    """The fact about ``subject`` and the first other known fact of the same relation."""
    facts = known_facts()
    fact = next(f for f in facts if f.subject == subject)
    neighbour = next(f for f in facts if f.relation == fact.relation and f.subject != subject)
    return fact, neighbour


def apply_edit(model, method: str, fact: Fact, layers: tuple[int, ...] | None = None):
    """Edit ``fact`` with the registered ``method``; returns the editor (``editor.undo()`` takes it back).
    ``layers``: the layers a weight editor writes, or a memory editor's layer (the first); None takes the
    method's defaults (tracing's critical layers, WISE's late layer)."""
    from editing.editor import create_editor, method as registered

    config = registered(method).config_class()
    names = {f.name for f in dataclasses.fields(config)}
    if "show_progress" in names:
        config = dataclasses.replace(config, show_progress=False)
    if layers and "layers" in names:
        config = dataclasses.replace(config, layers=layers)
    elif layers and "layer" in names:
        config = dataclasses.replace(config, layer=layers[0])
    editor = create_editor(method, model, config)
    editor.edit([fact])
    return editor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["memit", "wise"], default="memit")
    parser.add_argument("--subject", default=DEFAULT_SUBJECT, help="subject of a bundled known fact")
    parser.add_argument("--kinds", default="resid,mlp", help="comma-separated kinds to trace")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", default=None, help="comma-separated layers to edit (default: as the method)")
    args = parser.parse_args(argv)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None

    model = load_model(args.model)
    config = TraceConfig(kinds=tuple(args.kinds.split(",")), show_progress=False)
    fact, neighbour = pick_facts(args.subject)
    before = [trace_fact(model, fact, config=config), trace_fact(model, neighbour, config=config)]
    editor = apply_edit(model, args.method, fact, layers)
    try:
        after = [trace_fact(model, fact, answer=fact.target_new, config=config),
                 trace_fact(model, neighbour, config=config)]
    finally:
        editor.undo()
    out = Path(args.out_dir)
    name = args.method.upper()
    print(save_figure(plot_trace_comparison(before[0], after[0], title=(
        f"{name} edit \"{fact.prompt}\": {fact.target_true} → {fact.target_new}")),
        out / f"edit_then_trace_{args.method}.png"))
    print(save_figure(plot_trace_comparison(before[1], after[1], title=(
        f"Neighbour \"{neighbour.prompt}\" → {neighbour.target_true}, before and after the {name} edit")),
        out / f"edit_then_trace_{args.method}_neighbour.png"))


if __name__ == "__main__":
    main()
