"""``python -m editing.evaluate``: edit N facts with one method and write its scores under every scoring.

The unedited model is scored first (the table's first row: under teacher forcing it already gets part of
the new targets right); then the method edits the facts (one call of all N, or ``--sequential`` calls of
``--batch``) and they are scored under ``--protocol`` (:mod:`editing.protocol`). Every table names its
method, protocol and scoring in its header; the JSON records them as keys.

Where the dataset has them, portability questions are scored too (:mod:`editing.portability`): MQuAKE's
multi-hop questions and KnowEdit's portability prompts, as Port / Port-case (token) and gen-Port /
gen-Port-case (generated) columns. On MQuAKE data ``-n`` and ``--batch`` count cases, each edited whole in
one call. Metrics the dataset has no prompts for (MQuAKE: paraphrases, locality) get no column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tracing import cli


def dataset_facts(name_or_path: str) -> list:
    """The facts of ``--dataset``: ``known`` (the bundled known facts), or a name or file that
    :func:`tracing.datasets.load_dataset` reads (one-line error otherwise)."""
    return cli.facts_from(None if name_or_path == "known" else name_or_path)


def dataset_cases(name_or_path: str) -> list | None:
    """The MQuAKE cases of ``--dataset`` (:func:`tracing.datasets.mquake_cases`), or None for a dataset of
    another shape (read after :func:`dataset_facts`, which reports unreadable files)."""
    if name_or_path == "known":
        return None
    from tracing.datasets import dataset_shape, mquake_cases

    if dataset_shape(name_or_path) != "mquake":
        return None
    return mquake_cases(name_or_path)


def one_case_per_subject(cases: Sequence) -> list:
    """The cases none of whose rewrites edits a subject that an earlier kept case (or the case itself)
    already edits: :func:`tracing.facts.one_per_subject` for whole cases."""
    seen: set[str] = set()
    kept = []
    for case in cases:
        subjects = [fact.subject for fact in case.edits]
        if len(set(subjects)) == len(subjects) and not seen & set(subjects):
            kept.append(case)
            seen.update(subjects)
    return kept


def method_config(name: str, overrides: Sequence[tuple[str, Any]]):
    """The method's default config, quiet, with ``overrides``; an unknown field is a one-line error."""
    from editing.editor import method

    config_class = method(name).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted({field for field, _ in overrides} - fields)
    if unknown:
        cli.fail(f"--set: {config_class.__name__} has no field {', '.join(unknown)} "
                 f"(fields: {', '.join(sorted(fields))})")
    values = {"show_progress": False} if "show_progress" in fields else {}
    with cli.user_errors(TypeError, ValueError):
        return config_class(**{**values, **dict(overrides)})


def protocol_text(args) -> str:
    """How the facts were edited and when they were scored, for table headers."""
    n_rewrites = getattr(args, "n_rewrites", None)  # set for MQuAKE data, whose unit is a case
    what = f"{args.n_edits} MQuAKE cases ({n_rewrites} rewrites)" if n_rewrites else f"{args.n_edits} facts"
    if not args.sequential:
        return f"{what} in one call, scored after it"
    when = "after all calls" if args.protocol == "after_all" else "each call right after it"
    unit = (" case" if args.batch == 1 else " cases") if n_rewrites else ""
    return f"{what} in sequential calls of {args.batch}{unit}, scored {when} ({args.protocol})"


def tables(args, results: dict[str, dict[str, dict]], scorings: Sequence | None = None) -> str:
    """One Markdown table per scoring, unedited row first, its header naming method, protocol and scoring;
    ``scorings`` (default: ``args.scoring`` as named) say the columns."""
    from editing.evaluate import markdown_table
    from editing.scoring import scoring

    scorings = scorings or [scoring(name) for name in args.scoring]
    parts = [f"## {args.method} on {args.model}, dataset {args.dataset}: {protocol_text(args)}"]
    for chosen in scorings:
        name = chosen.name
        columns = dict(chosen.columns)
        if name == "probability" and args.generation_cases:
            columns["GE"] = "GE"
        rows = {row: {column: scores[name].get(key) for column, key in columns.items()}
                for row, scores in results.items()}
        corner = f"{args.method} · {args.protocol if args.sequential else 'one call'} · scoring: {name}"
        parts.append(markdown_table(rows, list(columns), plain=["GE"], corner=corner))
    return "\n\n".join(parts) + "\n"


def plot(args, results: dict[str, dict[str, dict]], scorings: Sequence | None = None):
    """Bars per metric, unedited and edited side by side, one panel per scoring (``scorings`` as in
    :func:`tables`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from editing.scoring import scoring
    from tracing.plot import STYLE

    scorings = scorings or [scoring(name) for name in args.scoring]
    with plt.rc_context(STYLE):
        width = 3.2 * len(scorings) + 0.4 * sum(len(chosen.plotted) > 3 for chosen in scorings)
        fig, axes = plt.subplots(1, len(scorings), figsize=(width, 3.0), squeeze=False)
        for ax, chosen in zip(axes[0], scorings):
            name = chosen.name
            x = np.arange(len(chosen.plotted))
            for i, (row, scores) in enumerate(results.items()):
                values = [scores[name].get(chosen.columns.get(c, c)) for c in chosen.plotted]
                heights = [np.nan if v is None else v for v in values]
                ax.bar(x + (i - 0.5) * 0.4, heights, width=0.4, label=row, color=f"C{i}")
            ax.set_xticks(x, chosen.plotted, fontsize=7 if len(chosen.plotted) > 4 else None)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"scoring: {name}", fontsize=9)
        axes[0][0].legend(frameon=False, fontsize=7)
        fig.suptitle(f"{args.method}: {protocol_text(args)}", fontsize=9)
        fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """``python -m editing.evaluate``'s work (arguments: :func:`editing.cli.evaluate_parser`)."""
    from editing.cli import parse_evaluate_args

    args = parse_evaluate_args(argv)
    cli.check_model_name(args.model)
    cli.check_device(args.device)
    from tracing.facts import one_per_subject, spread

    facts = dataset_facts(args.dataset)
    with cli.user_errors(OSError, ValueError, KeyError, TypeError):
        multi_hop = dataset_cases(args.dataset)
    if multi_hop is not None:  # MQuAKE: -n counts cases, every rewrite of a case is edited
        cases = spread(one_case_per_subject(multi_hop), args.n_edits)
        if len(cases) < args.n_edits:
            cli.fail(f"--dataset {args.dataset} has {len(cases)} MQuAKE cases whose rewrites edit distinct "
                     f"subjects; -n {args.n_edits} is too many")
        facts = [fact for case in cases for fact in case.edits]
        args.n_rewrites = len(facts)
    else:
        facts = spread(one_per_subject(facts), args.n_edits)
        if len(facts) < args.n_edits:
            cli.fail(f"--dataset {args.dataset} has {len(facts)} facts with distinct subjects; -n {args.n_edits} is too many")
    if any(fact.target_new is None for fact in facts):
        cli.fail(f"--dataset {args.dataset}: some facts have no new target to edit")
    config = method_config(args.method, args.overrides)

    import torch

    from editing.editor import create_editor
    from editing.evaluate import NoDataError, generation_entropy
    from editing.portability import knowedit_cases, multi_hop_cases, with_portability
    from editing.protocol import edit_and_score, record_unedited, score_now
    from editing.requests import EditRequestError, validate_requests
    from editing.scoring import absent_metrics, scoring
    from tracing.io import write_json_atomic, write_text_atomic
    from tracing.models import ModelUnavailableError, UnknownModelError, load_model

    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=args.device)
    with cli.user_errors(EditRequestError):
        validate_requests(model, facts)
    portability = multi_hop_cases(cases) if multi_hop is not None else knowedit_cases(facts)
    absent = absent_metrics(facts)
    scorings = [with_portability(scoring(name, absent), portability) for name in args.scoring]
    owner = {id(fact): i for i, case in enumerate(cases) for fact in case.edits} if multi_hop is not None else {}
    unit = (lambda fact: owner[id(fact)]) if owner else None  # no call splits an MQuAKE case
    with cli.user_errors(NoDataError):
        recorded = record_unedited(model, facts, scorings)  # once: the unedited row and after_all read it
        unedited = score_now(model, facts, scorings, recorded)
    with cli.user_errors(ValueError):  # e.g. layers out of range for this model: before anything changes
        editor = create_editor(args.method, model, config)
    try:
        with cli.user_errors(NoDataError, ModelUnavailableError):
            result = edit_and_score(model, editor, facts, args.batch, args.protocol, scorings, unit,
                                    recorded=recorded)
        if args.generation_cases:
            result.scores["probability"]["GE"] = generation_entropy(model, facts[: args.generation_cases])
    finally:
        editor.undo()
    if args.generation_cases:
        unedited["probability"]["GE"] = generation_entropy(model, facts[: args.generation_cases])
    results = {"unedited": unedited, f"{args.method} ({len(facts)} edits)": result.scores}
    table = tables(args, results, scorings)
    print(table, end="")
    out = args.out_dir
    stem = f"evaluate_{args.method}"
    write_text_atomic(out / f"{stem}.md", table)
    write_json_atomic(out / f"{stem}.json", {
        "method": args.method, "model": args.model, "dataset": args.dataset, "n_edits": len(facts),
        **({"n_cases": args.n_edits} if multi_hop is not None else {}),
        "protocol": args.protocol if args.sequential else "one_call", "sequential": args.sequential,
        "batch": args.batch, "calls": result.calls, "scoring": list(args.scoring),
        "seconds_editing": result.seconds_editing, "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(config), "facts": [fact.to_counterfact() for fact in facts],
        "absent_metrics": sorted(absent),
        **({"portability": [{"case_id": case.case_id, "questions": list(case.questions),
                             "answers": [list(answers) for answers in case.answers]} for case in portability]}
           if portability else {}),
        "unedited": unedited, "edited": result.scores,
    })
    figure = plot(args, results, scorings)
    figure.savefig(out / f"{stem}.png", dpi=150)
    print(f"wrote {out / stem}.md, .json, .png")
    return 0
