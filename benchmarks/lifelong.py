"""Lifelong (sequential) editing: every registered method by name, on the same facts, both protocols.

For each T, the same T known facts (a fixed shuffle of ``known_facts()``) are edited one call after the
other, ``--batch`` facts per call, through the editor interface (``editing.editor.create_editor``). Scored
with ``editing.evaluate.evaluate_accuracy`` (teacher-forced target-token accuracy on the prompts and their
paraphrases; locality = agreement with the *unedited* model's predictions, recorded before the first edit):

* ``after_all`` (WISE, EasyEdit ``--sequential_edit``): Rel / Gen / Loc on all T facts after the last call;
* ``after_each`` (AlphaEdit): each call's facts scored right after that call, averaged over the calls.

``unrelated`` is agreement on held-out known facts that no run edits, after the last call (both protocols).
``locality_other_subjects`` and ``unrelated_other_subjects`` are the same agreements on the prompts that
name no subject edited in the run (a subject-keyed edit is meant to reach every prompt about its subject,
so these separate leaks onto other subjects from effects on the edited subjects' other relations).

Routers also get ``routed`` / ``routed_and_answered`` (edit prompts that reach a memory, and are answered)
and ``routed_locality``; WISE's rows add ``routing_auc`` and ``score_auc``, the separation (AUC) of the edit
prompts from the locality prompts by the router's evidence and by the activation score alone.

``--edits 100,300,1000 --one-stream`` edits the largest T once and scores ``after_all`` at each smaller T
on the way (the first T facts, as a separate run of T would edit them, in the same calls): one stream
instead of three, and rows that are kept as they come.

``--facts zsre`` (or ``counterfact``, or a local zsRE / CounterFact JSON) streams a dataset's facts instead
of the bundled ones, the held-out facts taken from the same dataset; rows name it in ``facts``.

    python benchmarks/lifelong.py --methods wise,memit,grace --edits 1,10,100 [--batch 10] [--facts zsre]
                                  [--protocols after_all,after_each] [--set NAME.FIELD=VALUE] [--threads 2]

``--resume DIR`` makes a long stream survive a kill: its editor is saved every ``--save-every`` calls, and
the same command run again goes on from the last save (rows say ``resumed_at``).

One JSON object per row is appended to ``benchmarks/results/lifelong.jsonl`` (``--out``) as soon as it is
measured, so a long run keeps what it finished; each records the threads and the machine's 1-minute load
average when it finished (other jobs on the cores make the times upper bounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).parent))
import stream_checkpoint  # noqa: E402

from editing.cli import config_override  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "lifelong.jsonl"
PROTOCOLS = ("after_all", "after_each")


BUNDLED = "bundled"


def split_facts(seed: int, held_out: int, source: str = BUNDLED) -> tuple[list, list]:
    """The facts in a fixed shuffle: the pool every run takes its first T from, and the last ``held_out``
    that no run edits. ``source``: the bundled known facts (CounterFact-shaped), or a dataset name or file
    (``zsre``, ``counterfact``, a local JSON: :func:`tracing.datasets.load_dataset`), whose facts with a new
    target are kept, one per subject (a stream refuses two targets for one subject and relation)."""
    if source == BUNDLED:
        from tracing.facts import known_facts

        pool = known_facts()
    else:
        from tracing import cli
        from tracing.facts import one_per_subject

        pool = one_per_subject([fact for fact in cli.facts_from(source) if fact.target_new is not None])
    random.Random(seed).shuffle(pool)
    return pool[: len(pool) - held_out], pool[len(pool) - held_out:]


def embedded_stream(edits: int, threads: int | None = None, start: int = 0) -> tuple[Any, list, list]:
    """The embedded model, ``edits`` facts of the bundled stream from fact ``start`` on (the first ones by
    default) and the held-out facts, as every lifelong run here takes them (``split_facts(0, 200)``);
    ``threads`` sets torch's thread count first."""
    import torch

    from tracing.models import load_model

    if threads:
        torch.set_num_threads(threads)
    pool, held_out = split_facts(0, 200)
    if start + edits > len(pool):
        raise ValueError(f"the bundled stream has {len(pool)} facts: {edits} from {start} on is too many")
    return load_model("smollm2"), pool[start: start + edits], held_out


def default_config(name: str, overrides: dict[str, Any]):
    """The method's config with the benchmark's defaults (MEMIT: λ 1500, quiet) and ``overrides``."""
    from editing.editor import method

    config_class = method(name).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    defaults = {"show_progress": False} if "show_progress" in fields else {}
    if name in ("memit", "rome"):
        defaults["mom2_weight"] = 1500.0
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: {config_class.__name__} has no field {', '.join(unknown)}")
    return config_class(**{**defaults, **overrides})


def routing_shares(model, editor, facts: Sequence) -> dict[str, float | None]:
    """Share of the edit prompts that reach a memory, and that reach one *and* are answered (every target
    token the argmax under teacher forcing), and share of the locality prompts that reach one; None for
    methods that do not route. For routers that score (WISE), the separation of edit from locality
    prompts: ``routing_auc``, the AUC of the router's evidence (its largest score-to-threshold ratio over
    the memories the prompt may reach), and ``score_auc``, the same with every memory allowed (the
    activation score alone)."""
    from editing.evaluate import locality_pairs, read_continuations

    if not editor.routes:
        return {"routed": None, "routed_and_answered": None, "routed_locality": None, "routing_auc": None,
                "score_auc": None}
    edits = editor.route([f.prompt for f in facts])
    locality = editor.route([prompt for prompt, _ in locality_pairs(facts)])
    routed = [r.memory is not None for r in edits]
    answered = [c.accuracy == 1.0 for c in read_continuations(model, [(f.prompt, f.target_new) for f in facts])]
    scored = hasattr(edits[0], "margin") and bool(locality)
    return {"routed": sum(routed) / len(facts),
            "routed_and_answered": sum(r and a for r, a in zip(routed, answered)) / len(facts),
            "routed_locality": sum(r.memory is not None for r in locality) / len(locality) if locality else None,
            **{key: separation_auc([r.margin(gated) for r in edits], [r.margin(gated) for r in locality])
               if scored else None for key, gated in (("routing_auc", True), ("score_auc", False))}}


def separation_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the area under the ROC curve."""
    import numpy as np

    ordered = np.sort(np.asarray(negatives, dtype=float))
    values = np.asarray(positives, dtype=float)
    below = np.searchsorted(ordered, values, "left")
    ties = np.searchsorted(ordered, values, "right") - below
    return float((below + 0.5 * ties).sum() / (len(values) * len(ordered)))


def names_any(prompt: str, subjects: Sequence[str]) -> bool:
    """Whether ``prompt`` names one of ``subjects`` as a whole word (or words)."""
    return bool(subjects) and subject_pattern(tuple(subjects)).search(prompt) is not None


@functools.lru_cache(maxsize=8)
def subject_pattern(subjects: tuple[str, ...]) -> re.Pattern:
    """One compiled alternation for a set of subjects (per-subject patterns overflow ``re``'s cache at T = 1000)."""
    alternatives = "|".join(re.escape(subject) for subject in sorted(set(subjects), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def run_stream(model, name: str, config, facts: list, batch: int, protocol: str, held_out: list,
               checkpoints: Sequence[int] | None = None, on_row: Callable[[dict], None] = lambda row: None,
               resume: Path | None = None, save_every: int = 10) -> list[dict]:
    """Edit ``facts`` in calls of ``batch`` with a fresh editor, score them under ``protocol``, undo.

    One row per checkpoint (default: only ``len(facts)``); a checkpoint T scores the first T facts after
    the calls that edited them (``after_all`` only), exactly as a separate run of T would. ``on_row`` gets
    each row as soon as it is measured (a long stream keeps what it finished).

    ``resume``: a folder where the editor and the stream's progress are saved every ``save_every`` calls
    and after each scored T (:mod:`stream_checkpoint`); a stream started again with the same folder goes on
    from there (rows already written are not scored again) and clears it when it ends. ``after_all`` only."""
    from editing.editor import create_editor
    from editing.evaluate import agreement, evaluate_accuracy, locality_predictions
    from editing.protocol import batches

    checkpoints = sorted(set(checkpoints or [len(facts)]))
    if checkpoints[-1] != len(facts) or any(t % batch for t in checkpoints[:-1]) or checkpoints[0] < 1:
        raise ValueError(f"checkpoints {checkpoints} must end at T = {len(facts)} and fall between calls of {batch}")
    if len(checkpoints) > 1 and protocol != "after_all":
        raise ValueError("intermediate checkpoints are scored after_all only")
    if resume is not None and (protocol != "after_all" or save_every < 1):
        raise ValueError("a resumable stream is scored after_all and saved every >= 1 calls")
    run = stream_checkpoint.run_key(name, config, facts, held_out, batch, protocol, checkpoints)
    progress = stream_checkpoint.read_progress(resume, run) if resume is not None else None
    calls = batches(facts, batch)
    # the unedited model's answers, recorded before the first edit, on the prompts each score reads
    baselines = ([locality_predictions(model, call, facts) for call in calls] if protocol == "after_each"
                 else [None] * len(calls))
    from editing.evaluate import argmax_predictions

    unrelated = [(fact.prompt, fact.target_true) for fact in held_out]
    unrelated = (unrelated, argmax_predictions(model, unrelated))  # the same for every checkpoint
    prefix = {t: _unedited(model, facts[:t], unrelated) for t in checkpoints
              if progress is None or t > progress.edited}  # rows of T <= a resumed checkpoint are written
    per_call, seconds, rows, edited = [], 0.0, [], 0
    if progress is None:
        editor = create_editor(name, model, config)
    else:
        editor = stream_checkpoint.load_checkpoint(resume, progress, name, model, config, facts)
        edited, seconds = progress.edited, progress.seconds
        print(f"resuming {name} at T = {edited} ({seconds:.0f} s of editing so far) from {resume}", flush=True)
    try:
        for n, (call, baseline) in enumerate(zip(calls, baselines)):
            if sum(len(c) for c in calls[: n + 1]) <= edited:
                continue  # edited before the resumed checkpoint
            started = time.perf_counter()
            editor.edit(call)
            seconds += time.perf_counter() - started
            edited += len(call)
            if protocol == "after_each":
                per_call.append((call, evaluate_accuracy(model, call, baseline, facts)))
            if edited in prefix:
                scored, unedited = facts[:edited], prefix[edited]
                if protocol == "after_all":
                    per_call = [(scored, evaluate_accuracy(model, scored, unedited["locality"]))]
                other = {kind: agreement(model, pairs, base) if pairs else None
                         for kind, (pairs, base) in unedited["other_subjects"].items()}
                rows.append({**_weighted(per_call, scored), "unrelated": agreement(model, *unedited["unrelated"]),
                             "locality_other_subjects": other["locality"],
                             "unrelated_other_subjects": other["unrelated"],
                             "n_locality_other_subjects": len(unedited["other_subjects"]["locality"][0]),
                             "n_unrelated_other_subjects": len(unedited["other_subjects"]["unrelated"][0]),
                             **routing_shares(model, editor, scored), "s_per_edit": seconds / edited,
                             "resumed_at": progress.edited if progress else None, "T": edited})
                on_row(dict(rows[-1]))
            # after the row: a kill between the two scores that T again on resuming (a duplicate, not a loss)
            if resume is not None and edited < len(facts) and (edited in prefix or (n + 1) % save_every == 0):
                stream_checkpoint.write_checkpoint(resume, run, editor, edited, seconds)
    finally:
        editor.undo()
    if resume is not None:
        stream_checkpoint.clear(resume)
    return rows


def unedited_row(model, facts: list) -> dict:
    """The unedited model's row for ``facts`` (the floor every method's Rel. / Gen. is read against: later
    tokens of a multi-token target follow from the first, so it is above 0). Loc. and Unrel. are agreement
    with itself, 1 by definition."""
    from editing.protocol import score_now
    from editing.scoring import scoring

    summary = score_now(model, facts, [scoring("token")])["token"]  # python -m editing.evaluate's unedited row
    return {"reliability": summary["reliability"], "generalization": summary["generalization"],
            "locality": summary["locality"], "unrelated": 1.0, "s_per_edit": None, "T": len(facts)}


def _unedited(model, facts: list, unrelated: tuple[list, list]) -> dict:
    """What the unedited model answers on the prompts a score of ``facts`` reads: their locality prompts,
    the held-out facts (``unrelated``: pairs and their recorded answers), and both restricted to prompts
    that name no subject of ``facts``."""
    from editing.evaluate import locality_predictions

    subjects = sorted({fact.subject for fact in facts})
    locality = locality_predictions(model, facts)
    answers = {"locality": (list(locality.pairs), list(locality.predictions)), "unrelated": unrelated}
    other = {}
    for key, (pairs, predictions) in answers.items():
        kept = [i for i, (prompt, _) in enumerate(pairs) if not names_any(prompt, subjects)]
        other[key] = ([pairs[i] for i in kept], [predictions[i] for i in kept])
    return {"locality": locality, "unrelated": answers["unrelated"], "other_subjects": other}


def _weighted(per_call: list, facts: list) -> dict:
    """Rel / Gen / Loc over the scored calls, each weighted by the cases it read."""
    from editing.evaluate import merge_accuracy

    merged = merge_accuracy([summary for _, summary in per_call])
    mean = {key: getattr(merged, key) for key in ("reliability", "generalization", "locality")}
    for key, value in mean.items():
        if value is None:
            raise ValueError(f"no {key} cases among these facts: it cannot be scored")
    return mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="wise,memit", help="registered method names, comma-separated")
    parser.add_argument("--edits", default="1,10", help="comma-separated numbers of edited facts T")
    parser.add_argument("--batch", type=int, default=1, help="facts per edit call (all methods)")
    parser.add_argument("--one-stream", action="store_true",
                        help="edit the largest T once, scoring after_all at each T of --edits on the way")
    parser.add_argument("--protocols", default="after_all", help=f"comma-separated, of {', '.join(PROTOCOLS)}")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                        help="override a config field, e.g. --set wise.n_iter=30 (repeatable)")
    parser.add_argument("--facts", default=BUNDLED,
                        help="'bundled' (the known facts, CounterFact-shaped; default) or a dataset name or file "
                             "(zsre, counterfact, a local zsRE/CounterFact JSON), held-out facts taken from it too")
    parser.add_argument("--held-out", type=int, default=200, help="facts no run edits (the unrelated column)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="which facts (the shuffle of known_facts)")
    parser.add_argument("--unedited", action="store_true",
                        help="also write the unedited model's row (method 'unedited') at each T")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="save each stream's editor and progress under DIR (after_all only); run the same "
                             "command again to go on from the last save after a kill")
    parser.add_argument("--save-every", type=int, default=10, help="calls between saves with --resume")
    args = parser.parse_args(argv)
    try:
        edits = [int(n) for n in args.edits.split(",")]
        names, protocols = args.methods.split(","), args.protocols.split(",")
        if min(edits) < 1 or args.batch < 1 or args.held_out < 1:
            raise ValueError("--edits, --batch and --held-out must be positive")
        if set(protocols) - set(PROTOCOLS):
            raise ValueError(f"--protocols must be of {', '.join(PROTOCOLS)}, got {args.protocols!r}")
        if args.resume and (protocols != ["after_all"] or args.save_every < 1):
            raise ValueError("--resume takes --protocols after_all and --save-every >= 1")
        if args.one_stream and (protocols != ["after_all"] or any(t % args.batch for t in edits[:-1])
                                or edits != sorted(edits)):
            raise ValueError("--one-stream scores after_all at increasing T that fall between calls of --batch")
        overrides: dict[str, dict[str, Any]] = {name: {} for name in names}
        for item in args.set:
            name, dot, setting = item.partition(".")
            if not dot or name not in overrides:
                raise ValueError(f"--set {item}: expected METHOD.FIELD=VALUE with METHOD among --methods")
            try:
                field, value = config_override(setting)
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"--set {name}.{error}") from None
            overrides[name][field] = value
        configs = {name: default_config(name, overrides[name]) for name in names}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch

    from tracing.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    pool, held_out = split_facts(args.seed, args.held_out, args.facts)  # a bad --facts fails before the model
    if max(edits) > len(pool):
        print(f"error: only {len(pool)} facts of {args.facts} outside the held-out ones; T={max(edits)} is too many",
              file=sys.stderr)
        return 2
    model = load_model(args.model)
    facts_label = "counterfact-bundled" if args.facts == BUNDLED else Path(args.facts).stem
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    def write(row: dict, name: str, protocol: str) -> None:
        record = {"method": name, "T": row.pop("T"), "batch": args.batch, "protocol": protocol,
                  "facts": facts_label, **row,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
                  "model": args.model, "seed": args.seed, "one_stream": args.one_stream,
                  "config": {k: v for k, v in overrides.get(name, {}).items()}}
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    if args.unedited:
        for t in sorted(set(edits)):
            write(unedited_row(model, pool[:t]), "unedited", "after_all")
    streams = [(max(edits), edits)] if args.one_stream else [(t, [t]) for t in edits]
    for t, checkpoints in streams:
        for name in names:
            for protocol in protocols:
                folder = Path(args.resume) / f"{name}-T{t}-batch{args.batch}" if args.resume else None
                run_stream(model, name, configs[name], pool[:t], args.batch, protocol, held_out, checkpoints,
                           lambda row, name=name, protocol=protocol: write(row, name, protocol), folder,
                           args.save_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
