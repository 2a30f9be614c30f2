"""Lifelong (sequential) editing: WISE against MEMIT applied sequentially (and GRACE on request).

For each T, the same T known facts (a fixed shuffle of ``known_facts()``) are edited one after the other,
one fact or ``--batch`` facts per call; after the last edit, Rel / Gen / Loc
(editing.evaluate.evaluate_accuracy: teacher-forced target-token accuracy on the prompts and their
paraphrases, and agreement with the unedited model on the facts' locality prompts) are measured on all T
facts, as in the WISE paper's protocol, plus agreement on held-out known facts that no run edits.

    python benchmarks/lifelong.py --edits 1,10 [--methods wise,memit,grace] [--batch 10] [--wise n_iter=30]
                                  [--model smollm2] [--threads 2]

Rows are written to ``benchmarks/results/lifelong.json`` (``--out``) after every run, so a long run keeps
what it finished.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import random
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from editing.evaluate import (AccuracySummary, agreement, argmax_predictions, evaluate_accuracy,
                              locality_predictions, markdown_table)
from editing.grace import GraceConfig, GraceEditor
from editing.memit import MemitConfig, apply_memit
from editing.wise import WiseConfig, WiseEditor
from tracing.facts import Fact, known_facts
from tracing.io import write_json_atomic
from tracing.models import load_model

DEFAULT_OUT = Path(__file__).parent / "results" / "lifelong.json"


def split_facts(seed: int, held_out: int) -> tuple[list[Fact], list[Fact]]:
    """The known facts in a fixed shuffle: the pool every run takes its first T from, and the last
    ``held_out`` that no run edits."""
    pool = known_facts()
    random.Random(seed).shuffle(pool)
    return pool[: len(pool) - held_out], pool[len(pool) - held_out:]


def batches(facts: list[Fact], size: int) -> list[list[Fact]]:
    return [facts[i: i + size] for i in range(0, len(facts), size)]


def run_attached(model, facts: list[Fact], editor: WiseEditor | GraceEditor,
                 batch: int = 1) -> tuple[Callable[[], None], float]:
    """Attach ``editor`` (WISE or GRACE) and edit ``facts`` one batch after the other; returns the undo
    (detach) and the seconds spent editing (attaching, which for WISE samples the context and unrelated
    texts once, is not counted)."""
    editor.attach(model)
    started = time.perf_counter()
    for chunk in tqdm(batches(facts, batch), desc=type(editor).__name__, leave=False, mininterval=30):
        editor.edit(chunk)
    return editor.detach, time.perf_counter() - started


def run_memit(model, facts: list[Fact], config: MemitConfig, batch: int = 1) -> tuple[Callable[[], None], float]:
    """Apply MEMIT once per batch, each on top of the previous edits; returns the undo of them all and the
    seconds spent editing."""
    started = time.perf_counter()
    edits = [apply_memit(model, chunk, config)
             for chunk in tqdm(batches(facts, batch), desc="MEMIT", leave=False, mininterval=30)]
    seconds = time.perf_counter() - started

    def undo() -> None:
        for edit in reversed(edits):
            edit.undo(model)

    return undo, seconds


def evaluate(model, method: str, facts: list[Fact], run: Callable, held_out: list[Fact]) -> dict:
    """Rel/Gen/Loc on the edited facts after all edits, plus ``unrelated``: agreement with the unedited
    model on ``held_out`` facts that no run edits (random known facts, any relation)."""
    baseline = locality_predictions(model, facts)
    unrelated_pairs = [(fact.prompt, fact.target_true) for fact in held_out]
    unrelated_baseline = argmax_predictions(model, unrelated_pairs)
    undo, seconds = run(model, facts)
    try:
        summary: AccuracySummary = evaluate_accuracy(model, facts, baseline)
        unrelated = agreement(model, unrelated_pairs, unrelated_baseline)
    finally:
        undo()
    print(f"{method} T={len(facts)}: {summary}, unrelated {unrelated:.3f}, {seconds / len(facts):.1f} s per edit",
          flush=True)
    return {**summary.as_dict(), "unrelated": unrelated, "s/edit": seconds / len(facts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--edits", default="1,10", help="comma-separated numbers of sequential edits T")
    parser.add_argument("--methods", default="wise,memit", help="any of wise, memit, grace")
    parser.add_argument("--merge", action="store_true", help="WISE-Merge instead of WISE-Retrieve")
    parser.add_argument("--save-freq", type=int, default=WiseConfig.save_freq, help="WISE: edits per shard")
    parser.add_argument("--merge-freq", type=int, default=WiseConfig.merge_freq, help="WISE: edits per merge")
    parser.add_argument("--wise", action="append", default=[], metavar="KEY=VALUE",
                        help="a WiseConfig field to override, e.g. --wise n_iter=40 (repeatable)")
    parser.add_argument("--batch", type=int, default=1, help="facts per edit call (all methods)")
    parser.add_argument("--held-out", type=int, default=200,
                        help="facts kept out of every run, for the unrelated-locality column")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="which facts (the shuffle of known_facts)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    pool, held_out = split_facts(args.seed, args.held_out)
    overrides = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.wise)}
    wise_config = WiseConfig(retrieve=not args.merge, save_freq=args.save_freq, merge_freq=args.merge_freq,
                             **overrides)
    runners = {  # a fresh editor per run: each T starts from the unedited model
        "wise": lambda m, f: run_attached(m, f, WiseEditor(wise_config), args.batch),
        "grace": lambda m, f: run_attached(m, f, GraceEditor(GraceConfig()), args.batch),
        "memit": lambda m, f: run_memit(m, f, MemitConfig(mom2_weight=1500, show_progress=False), args.batch),
    }
    changed = [f"{f.name} {getattr(wise_config, f.name)}" for f in dataclasses.fields(WiseConfig)
               if getattr(wise_config, f.name) != getattr(WiseConfig(), f.name)]
    labels = {"wise": f"wise ({', '.join(changed)})" if changed else "wise"}
    suffix = f", batch {args.batch}" if args.batch > 1 else ""
    rows = {}
    for t in (int(n) for n in args.edits.split(",")):
        if t > len(pool):
            raise SystemExit(f"only {len(pool)} known facts outside the held-out ones; T={t} is too many")
        for method in args.methods.split(","):
            label = labels.get(method, method)
            rows[f"{label} T={t}{suffix}"] = evaluate(model, label, pool[:t], runners[method], held_out)
            write_json_atomic(args.out, rows)
    print(markdown_table(rows, ["reliability", "generalization", "locality", "unrelated", "s/edit"],
                         plain=["s/edit"]))


if __name__ == "__main__":
    main()
