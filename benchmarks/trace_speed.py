"""Time one full causal-tracing heatmap (all three kinds) with the fast engine and the naive one.

The naive engine is what kmeng01/rome does: one forward pass of [1 clean + N corrupted] rows per cell.
Prints both times, the speed-up and the largest difference between the two heatmaps.

    python benchmarks/trace_speed.py [--model smollm2] [--prompt ... --subject ...] [--samples 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from tracing.causal_trace import TraceConfig, trace_prompt
from tracing.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", default="resid,mlp,attn")
    args = parser.parse_args()

    model = load_model(args.model)
    config = TraceConfig(kinds=tuple(args.kinds.split(",")), samples=args.samples, verify=False)
    trace_prompt(model, "The capital of France is", "France", config=dataclasses.replace(config, show_progress=False))

    timings, traces = {}, {}
    for engine in ("fast", "reference"):
        started = time.perf_counter()
        traces[engine] = trace_prompt(model, args.prompt, args.subject,
                                      config=dataclasses.replace(config, engine=engine))
        timings[engine] = time.perf_counter() - started

    fast, naive = traces["fast"], traces["reference"]
    difference = max(float(np.abs(fast.scores[k] - naive.scores[k]).max()) for k in fast.kinds)
    cells = fast.n_tokens * fast.n_layers * len(fast.kinds)
    print(f"model {args.model}, {fast.n_tokens} tokens x {fast.n_layers} layers x {len(fast.kinds)} kinds "
          f"= {cells} cells, {args.samples} noise samples, torch threads {torch.get_num_threads()}")
    print(f"naive (one forward per cell): {timings['reference']:8.1f} s")
    print(f"fast (prefix KV + per-block entry): {timings['fast']:8.1f} s")
    print(f"speed-up: {timings['reference'] / timings['fast']:.1f}x   (goal >= 5x)")
    print(f"largest |difference| in p: {difference:.2e}   (goal <= 1e-4)")


if __name__ == "__main__":
    main()
