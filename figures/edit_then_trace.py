"""README figure: trace a fact before and after editing it, and a neighbouring fact, side by side.

    python -m figures.edit_then_trace --method memit [--out-dir docs]
    python -m figures.edit_then_trace --method wise

Before: the true answer on the unedited model. After: the new answer on the edited model. The
difference column shows where the new answer is read from: MEMIT's edited MLP layers at the subject, or
WISE's side-memory layer. The neighbour (same relation, another subject, its own answer) should not move.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_SUBJECT = "Germany"


def pick_facts(subject: str):
    """The fact about ``subject`` and the first other known fact of the same relation."""
    from tracing.facts import known_facts

    facts = known_facts()
    fact = next(f for f in facts if f.subject == subject)
    neighbour = next(f for f in facts if f.relation == fact.relation and f.subject != subject)
    return fact, neighbour


def apply_edit(model, method: str, fact, layers: tuple[int, ...] | None = None, corpus_samples: int | None = None):
    """Edit ``fact`` with the registered ``method``; returns the editor (``editor.undo()`` takes it back).
    ``layers``: the layers a weight editor writes, or a memory editor's layer (the first); None takes the
    method's defaults (tracing's critical layers, WISE's late layer). ``corpus_samples``: C0's sample count
    for methods that use key statistics (None: their default)."""
    from editing.editor import create_editor, method as registered

    config = registered(method).config_class()
    names = {f.name for f in dataclasses.fields(config)}
    if "show_progress" in names:
        config = dataclasses.replace(config, show_progress=False)
    if layers and "layers" in names:
        config = dataclasses.replace(config, layers=layers)
    elif layers and "layer" in names:
        config = dataclasses.replace(config, layer=layers[0])
    if corpus_samples and "corpus" in names:
        config = dataclasses.replace(config, corpus=dataclasses.replace(config.corpus, samples=corpus_samples))
    editor = create_editor(method, model, config)
    editor.edit([fact])
    return editor


def main(argv: list[str] | None = None) -> None:
    from tracing import cli

    parser = cli.ArgumentParser(prog="python -m figures.edit_then_trace", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="memit", type=cli.text,
                        help="a registered editing method: memit, rome, wise, grace, ... (default memit)")
    parser.add_argument("--subject", default=DEFAULT_SUBJECT, type=cli.text,
                        help=f"subject of a bundled known fact (default {DEFAULT_SUBJECT})")
    parser.add_argument("--kinds", default=("resid", "mlp"), type=cli.kind_list,
                        help="comma-separated kinds to trace (default resid,mlp)")
    parser.add_argument("--out-dir", default="docs", type=cli.output_folder, help="folder for the figures (default docs)")
    parser.add_argument("--model", default=cli.DEFAULT_MODEL, type=cli.text, help="model name or folder")
    parser.add_argument("--layers", default=None, type=cli.layer_list,
                        help="comma-separated layers to edit (default: as the method)")
    parser.add_argument("--corpus-samples", default=None, type=cli.int_at_least(1),
                        help="texts C0 is measured on, for methods with key statistics (default: the method's, 1000)")
    args = parser.parse_args(argv)
    layers = args.layers
    from editing.editor import method as registered
    from tracing.adapter import ModelAdapter
    from tracing.causal_trace import TraceConfig, trace_fact
    from tracing.models import ModelUnavailableError, load_model
    from tracing.plot import plot_trace_comparison, save_figure

    with cli.user_errors(ValueError):
        registered(args.method)
    try:
        fact, neighbour = pick_facts(args.subject)
    except StopIteration:
        cli.fail(f"--subject {args.subject!r} is not the subject of a bundled known fact that has a neighbour "
                 f"(e.g. {DEFAULT_SUBJECT!r})")
    cli.check_model_name(args.model)

    with cli.user_errors(ModelUnavailableError):
        model = load_model(args.model)
    n_layers = ModelAdapter.of(model).n_layers
    if layers and max(layers) >= n_layers:
        cli.fail(f"argument --layers: {args.model} has layers 0 to {n_layers - 1}, got {list(layers)}")
    config = TraceConfig(kinds=args.kinds, show_progress=False)
    before = [trace_fact(model, fact, config=config), trace_fact(model, neighbour, config=config)]
    editor = apply_edit(model, args.method, fact, layers, args.corpus_samples)
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
