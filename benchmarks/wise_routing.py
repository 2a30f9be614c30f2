"""Where WISE routes after T sequential edits: the lifelong metrics plus the share of prompts each kind
sends to a side memory, for one configuration at a time (the ablations in docs/wise.md).

    python benchmarks/wise_routing.py NAME T [batch=10] [threads=1] [FIELD=VALUE ...]

Same facts, held-out set and metrics as ``benchmarks/lifelong.py`` (Rel / Gen / Loc / Unrel), WISE with
``n_iter=30, edit_lr=2.0, corrupted_samples=8`` unless overridden, one thread unless
``threads=N``. Besides the metrics it reports
the routed share of the edit prompts, of the locality prompts (split by whether they name a subject edited
in another relation) and of the held-out facts, and appends a row to
``benchmarks/results/wise_routing.jsonl``; ``--save`` keeps the editor for offline analysis.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from editing.cli import config_override
from editing.evaluate import agreement, argmax_predictions, evaluate_accuracy, locality_pairs
from editing.wise import WiseConfig, WiseEditor
from lifelong import embedded_stream

OUT = Path(__file__).parent / "results" / "wise_routing.jsonl"
BENCHMARK = dict(n_iter=30, edit_lr=2.0, corrupted_samples=8)


def share(values, mask) -> tuple[float, int]:
    picked = [v for v, m in zip(values, mask) if m]
    return (float(np.mean(picked)) if picked else float("nan")), len(picked)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--save"]
    name, t = args[0], int(args[1])
    overrides = dict(config_override(a) for a in args[2:])  # FIELD=VALUE, a Python literal as everywhere
    batch = overrides.pop("batch", 10)
    model, facts, held_out = embedded_stream(t, overrides.pop("threads", 1))
    loc = locality_pairs(facts)
    unrelated = [(f.prompt, f.target_true) for f in held_out]
    loc_baseline, unrelated_baseline = argmax_predictions(model, loc), argmax_predictions(model, unrelated)
    editor = WiseEditor(WiseConfig(**{**BENCHMARK, **overrides})).attach(model)
    started = time.perf_counter()
    for i in range(0, t, batch):
        editor.edit(facts[i: i + batch])
    seconds = (time.perf_counter() - started) / t
    edited = {f.subject for f in facts}
    summary = evaluate_accuracy(model, facts, loc_baseline)

    def routed(prompts):
        return [r.memory is not None for r in editor.route(prompts)]

    loc_routed = routed([p for p, _ in loc])
    naming = [any(s in p for s in edited) for p, _ in loc]
    row = dict(name=name, T=t, batch=batch, config=overrides, memories=len(editor.memories),
               reliability=summary.reliability, generalization=summary.generalization, locality=summary.locality,
               unrelated=agreement(model, unrelated, unrelated_baseline), s_per_edit=seconds,
               routed_edits=float(np.mean(routed([f.prompt for f in facts]))),
               routed_locality=float(np.mean(loc_routed)),
               routed_locality_naming_edited=share(loc_routed, naming),
               routed_locality_other=share(loc_routed, [not n for n in naming]),
               routed_unrelated=float(np.mean(routed([p for p, _ in unrelated]))))
    print(json.dumps(row), flush=True)
    with OUT.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    if "--save" in sys.argv:
        editor.save(OUT.parent / f"{name}.safetensors")


if __name__ == "__main__":
    main()
