"""How close attribution patching comes to exact tracing: Pearson r and top-k agreement per kind.

Traces N bundled known facts (spread over the relations) exactly and by AtP, with the same noise, and
writes the comparison (per kind: mean per-fact Pearson r, pooled r, top-k agreement, r of the last-subject-
token AIE curves; CPU seconds of each method) to benchmarks/results/atp_accuracy.json.

    python benchmarks/atp_accuracy.py                         # embedded model, 50 facts, all kinds
    python benchmarks/atp_accuracy.py --model tiny-llama --facts 3 --out /tmp/atp.json
    python benchmarks/atp_accuracy.py --steps 1,2,4 --kinds mlp,attn   # AtP and integrated gradients, one exact run
    python benchmarks/atp_accuracy.py --spaces log_odds,metric         # linear in log-odds, and in p itself

With several ``--steps`` (TraceConfig.atp_steps: gradients averaged over noise scales, 1 = plain AtP) or
``--spaces`` (TraceConfig.atp_space) the facts are traced exactly once and every setting (each space with
each step count) is compared with those traces; the record of the first goes to the top level of the file,
all of them under ``by_setting``, keyed ``"<space>, steps <k>"``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from tracing.atp_accuracy import atp_accuracy, traced
from tracing.causal_trace import TraceConfig
from tracing.cli import CORRUPTIONS, METRICS, kind_list
from tracing.facts import known_facts, spread
from tracing.io import write_json_atomic
from tracing.models import load_model, model_spec

RESULTS = Path(__file__).parent / "results" / "atp_accuracy.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--facts", type=int, default=50)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", type=kind_list, default=("resid", "mlp", "attn"))
    parser.add_argument("--corruption", choices=CORRUPTIONS, default="gaussian")
    parser.add_argument("--metric", choices=METRICS, default="prob")
    parser.add_argument("--top-k", type=int, default=10, help="cells compared by top-k agreement (default 10)")
    parser.add_argument("--steps", default="1", help="comma-separated AtP step counts (default 1)")
    parser.add_argument("--spaces", default="log_odds",
                        help="comma-separated spaces the AtP estimate is linear in: log_odds (default), metric")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    model = load_model(args.model)
    facts = spread(known_facts(), args.facts)
    settings = [(space, int(n)) for space in args.spaces.split(",") for n in args.steps.split(",")]
    configs = [TraceConfig(kinds=args.kinds, samples=args.samples, corruption=args.corruption, metric=args.metric,
                           atp_steps=n, atp_space=space)
               for space, n in settings]  # refused here, before any trace, if a value is bad
    exact = traced(model, facts, configs[0], "exact")
    results = [atp_accuracy(model, facts, config, k=args.top_k, exact=exact) for config in configs]
    records = [{"model": model_spec(model).name, "torch_threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0], **r.as_record()} for r in results]
    write_json_atomic(args.out, {**records[0], "by_setting": {f"{space}, steps {n}": r
                                                              for (space, n), r in zip(settings, records)}})
    for result in results:
        _report(args, result)
    print(f"-> {args.out}")
    return 0


def _report(args, result) -> None:
    print(f"{args.model}, {result.n_facts} facts, {args.samples} samples, {args.corruption}, {args.metric}, "
          f"{torch.get_num_threads()} threads, AtP linear in {result.config.atp_space}, "
          f"steps {result.config.atp_steps}")
    print(f"CPU time: exact {result.exact_seconds:.1f} s, AtP {result.atp_seconds:.1f} s ({result.speedup:.0f}x)")
    print(f"{'kind':<6} {'pearson':>8} {'pooled':>8} {f'top-{args.top_k}':>8} {'curve r':>8}")
    for kind, acc in result.kinds.items():
        print(f"{kind:<6} {acc.pearson:8.3f} {acc.pearson_pooled:8.3f} {acc.top_k:8.2f} {acc.curve_pearson:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
