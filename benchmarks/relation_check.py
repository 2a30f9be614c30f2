"""The relation check (``relation_similarity``) of the subject memory or of WISE's subject gate: Rel / Gen
against Loc / Unrel as the threshold varies.

The check only decides where an edit answers; what the edits wrote (the subject memory's keys and δ, WISE's
side memories) does not depend on it. So one stream of
T edits (calls of ``--batch``, as ``benchmarks/lifelong.py`` makes them, the same facts) is made once and
scored after all edits at every threshold, off included, with the lifelong benchmark's metrics: Rel / Gen
/ Loc (teacher-forced, Loc against the unedited model's answers recorded before the first edit), Unrel on
the held-out facts, both also on the prompts naming no edited subject, and routed-and-answered.

    python benchmarks/relation_check.py [--method subject-memory|wise] [--edits 1000] [--thresholds off,0.3,0.5]
                                        [--start K] [--autocast bfloat16] [--relation-layer L] [--memory PATH]
                                        [--answer-logprob X] [--scorings probability,generated] [--unedited]
                                        [--threads 1]

``--start``: the stream's first fact in the bundled pool (0; 1000 streams facts no threshold was chosen on).
``--method``: the subject memory (default) or WISE, each with its defaults but the check. ``--autocast``:
the subject memory's δ optimisation. ``--relation-layer``: the layer whose residual the check reads
(default: the method's; 0.9 of the depth for the subject memory, 0.8 for WISE, before its side layer). ``--memory``: where
the stream's memory is saved every ten calls (atomically); run again, it goes on from there, and a finished
memory is scored without editing again (its relation keys are made again if they belong to another relation
layer). ``--answer-logprob``: the subject memory's old-answer check beside the relation check (an entry
answers only where the unedited model gives its old answer at least that log-probability after the
subject; ``SubjectMemoryConfig.answer_logprob``, -5 by default; ``off``: the relation check alone). ``--scorings``: the other two scorings of ``editing.scoring`` beside the token accuracy every row
has (probability comparison: ES / PS / NS; generated answers: gen-Rel / gen-Gen / gen-Loc), each under its
name in the row, their unedited baselines recorded before the first edit. ``--unedited``: first a row of the
unedited model on the same facts in the same scorings (``method`` "unedited"; the floor the table reads the
edits against); with ``--thresholds ""`` only that row, nothing is edited. One JSON object per threshold
is appended to benchmarks/results/relation_check.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
DEFAULT_OUT = Path(__file__).parent / "results" / "relation_check.jsonl"


def parse_thresholds(text: str) -> list[float | None]:
    return [None if part.strip() == "off" else float(part) for part in text.split(",") if part.strip()]


def parse_logprob(text: str) -> float | str:
    return "off" if text.strip() == "off" else float(text)


def parse_scorings(text: str) -> tuple[str, ...]:
    from editing.scoring import SCORINGS

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in SCORINGS or name == "token"]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown or always-on scorings {unknown}; choose from probability, generated")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("subject-memory", "wise"), default="subject-memory")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0, help="the stream's first fact in the bundled pool "
                        "(e.g. 1000: facts no threshold was chosen on)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--thresholds", type=parse_thresholds, default=parse_thresholds("off,0.3,0.35,0.4,0.45"))
    parser.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                        help="the δ optimisation under torch.autocast (editing.targets.TargetConfig)")
    parser.add_argument("--relation-layer", type=int, default=None)
    parser.add_argument("--answer-logprob", type=parse_logprob, default=None,
                        help="subject memory: the old-answer check at this log-probability, or off "
                             "(SubjectMemoryConfig.answer_logprob; default: the config's)")
    parser.add_argument("--memory", default=None, help="save / resume the stream's memory here")
    parser.add_argument("--scorings", type=parse_scorings, default=(),
                        help="also score with these (comma-separated: probability, generated)")
    parser.add_argument("--unedited", action="store_true", help="also a row of the unedited model, first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.answer_logprob is not None and args.method != "subject-memory":
        parser.error("--answer-logprob is a check of the subject memory")

    import torch

    from editing.evaluate import agreement, argmax_predictions, evaluate_accuracy
    from editing.protocol import batches, record_unedited
    from editing.scoring import scoring
    from editing.subject_memory import SubjectMemoryConfig, SubjectMemoryEditor
    from editing.targets import TargetConfig
    from editing.wise import WiseConfig, WiseEditor
    from lifelong import _unedited, _weighted, embedded_stream, routing_shares

    if args.answer_logprob is None:  # the subject memory's default, "off": the relation check alone
        args.answer_logprob = SubjectMemoryConfig.answer_logprob if args.method == "subject-memory" else None
    elif args.answer_logprob == "off":
        args.answer_logprob = None
    model, facts, held_out = embedded_stream(args.edits, args.threads, args.start)
    if args.method == "wise":
        editor_class, config = WiseEditor, WiseConfig(relation_layer=args.relation_layer)
    else:
        editor_class = SubjectMemoryEditor
        config = SubjectMemoryConfig(targets=TargetConfig(autocast=args.autocast), relation_layer=args.relation_layer,
                                     answer_logprob=args.answer_logprob)
    unrelated = [(fact.prompt, fact.target_true) for fact in held_out]
    unedited = _unedited(model, facts, (unrelated, argmax_predictions(model, unrelated)))
    others = [scoring(name) for name in args.scorings]
    recorded = record_unedited(model, facts, others)  # before the first edit (a resumed memory is attached later)

    def scores() -> dict:
        """Rel / Gen / Loc (token accuracy), the other scorings under their names, Unrel."""
        token = _weighted([(facts, evaluate_accuracy(model, facts, unedited["locality"]))], facts)
        return {**token, **{s.name: s.merge([s.read(model, facts, recorded[s.name], facts)]) for s in others},
                "unrelated": agreement(model, *unedited["unrelated"])}

    def append(row: dict) -> None:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    common = {"start": args.start, "T": len(facts), "batch": args.batch, "protocol": "after_all",
              "facts": "counterfact-bundled"}
    if args.unedited:
        append({"method": "unedited", **common, **scores(), "threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0]})
    if not args.thresholds:  # --thresholds "": the unedited row only
        return 0
    memory = Path(args.memory) if args.memory else None
    if memory is not None and memory.exists():
        editor = editor_class.load(memory)
        if editor.facts != facts[: len(editor.facts)]:
            raise SystemExit(f"{memory} holds another stream's edits")
        editor.config = dataclasses.replace(editor.config, relation_layer=args.relation_layer,
                                            **({"answer_logprob": args.answer_logprob}
                                               if args.method == "subject-memory" else {}))
        editor.attach(model)  # relation keys of another layer are made again here
        print(f"resuming at T = {len(editor.facts)} from {memory}", flush=True)
    else:
        editor = editor_class(config).attach(model)
    started, calls = time.perf_counter(), batches(facts, args.batch)
    try:
        for n, call in enumerate(calls):
            if sum(len(c) for c in calls[: n + 1]) <= len(editor.facts):
                continue
            editor.edit(call)
            done = len(editor.facts)
            if memory is not None and ((n + 1) % 10 == 0 or done == len(facts)):
                editor.save(memory)
            print(f"T = {done}: {time.perf_counter() - started:.0f} s", flush=True)
        seconds = time.perf_counter() - started
        for threshold in args.thresholds:
            editor.detach()  # WISE makes its relation keys when attached under a config that checks
            editor.config = dataclasses.replace(editor.config, relation_similarity=threshold)
            editor.attach(model)
            began = time.perf_counter()
            scored = scores()
            other = {kind: agreement(model, pairs, base) if pairs else None
                     for kind, (pairs, base) in unedited["other_subjects"].items()}
            row = {"method": args.method, "relation_similarity": threshold, "answer_logprob": args.answer_logprob,
                   "relation_layer": (editor.relation_layer if args.method == "subject-memory" else
                                      editor.config.resolved_relation_layer(len(model.blocks))), **common, **scored,
                   "locality_other_subjects": other["locality"], "unrelated_other_subjects": other["unrelated"],
                   **routing_shares(model, editor, facts), "edit_seconds_this_run": seconds,
                   "score_seconds": time.perf_counter() - began,
                   "autocast": args.autocast if args.method == "subject-memory" else None,
                   "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
            append(row)
    finally:
        editor.undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
