"""MEMIT at scale on the embedded model: time, peak memory and CounterFact quality for 1..1000 edits.

    python benchmarks/memit_scale.py [--counts 1,10,100,1000] [--threads 2] [--autocast bfloat16] [--out FILE]

Each count runs in a fresh process (so peak memory is that run's own) on facts spread evenly over the
bundled known facts (one per subject). Quality is measured on the edited facts before and after the edit; the goal at 1000
edits is ES >= 0.95, PS >= 0.8 and NS within 0.1 of the unedited model. `python -m figures.memit_scaling`
draws the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "memit_scale.json"


def run_one(n_edits: int, generation_cases: int, autocast: str | None = None) -> dict:
    from editing.evaluate import evaluate_counterfact
    from editing.memit import MemitConfig, apply_memit
    from editing.targets import TargetConfig
    from tracing.facts import known_facts, one_per_subject, spread
    import torch

    from tracing.models import load_model

    model = load_model("smollm2")
    facts = spread(one_per_subject(known_facts()), n_edits)
    if len(facts) < n_edits:
        raise SystemExit(f"only {len(facts)} known facts; cannot edit {n_edits}")
    before = evaluate_counterfact(model, facts, generation_cases)
    started = time.perf_counter()
    edit = apply_memit(model, facts, MemitConfig(show_progress=False, targets=TargetConfig(autocast=autocast)))
    seconds = time.perf_counter() - started
    after = evaluate_counterfact(model, facts, generation_cases)
    return {
        "n_edits": n_edits,
        "autocast": autocast,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "layers": list(edit.layers),
        "mom2_weight": edit.config["mom2_weight"],
        "before": before.as_dict(),
        "after": after.as_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100,1000")
    parser.add_argument("--generation-cases", type=int, default=10)
    parser.add_argument("--out", default=None,
                        help="results file (default benchmarks/results/memit_scale.json, memit_scale_bfloat16.json "
                             "with --autocast bfloat16); counts already in it and not run again are kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                        help="the target vectors' optimisation under autocast (TargetConfig.autocast)")
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.single is not None:
        print(json.dumps(run_one(args.single, args.generation_cases, args.autocast)))
        return
    from tracing.io import write_json_atomic

    out = Path(args.out or (DEFAULT_OUT if not args.autocast else DEFAULT_OUT.with_stem(f"memit_scale_{args.autocast}")))
    results = json.loads(out.read_text()) if out.exists() else []  # counts not run again are kept
    for n in (int(c) for c in args.counts.split(",")):
        command = [sys.executable, __file__, "--single", str(n), "--generation-cases", str(args.generation_cases)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.autocast:
            command += ["--autocast", args.autocast]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        results = sorted([r for r in results if r["n_edits"] != n] + [result], key=lambda r: r["n_edits"])
        b, a = result["before"], result["after"]
        print(f"{n:>5} edits: {result['seconds']:7.1f} s ({result['seconds'] / n:.2f} s/edit), "
              f"peak {result['peak_rss_mb']} MB | ES {a['ES']:.3f} PS {a['PS']:.3f} "
              f"NS {a['NS']:.3f} (unedited {b['NS']:.3f}, drop {b['NS'] - a['NS']:+.3f}) score {a['score']:.3f}",
              flush=True)
        write_json_atomic(out, results)  # after every count, so a long run keeps what it finished
    print(f"written to {out}")


if __name__ == "__main__":
    main()
