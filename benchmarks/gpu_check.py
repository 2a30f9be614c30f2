"""Run the embedded model's four standard jobs on a GPU and compare every number with stored CPU results.

    python benchmarks/gpu_check.py [--device cuda|cpu|cuda:1] [--device-map auto|N] [--quick]
                                   [--write-reference] [--out benchmarks/results/gpu_check.json]

Jobs: the Eiffel heatmap (3 kinds), locate on 50 known facts (average MLP effects, critical layers), a
100-fact MEMIT edit (CounterFact ES/PS/NS) and a 10-fact WISE stream (Rel./Gen./Loc.). ``--quick`` runs
the same jobs on the 4-layer ``tiny-llama`` with 2 facts, 1 edit and 1 WISE edit (about half a minute on
a CPU), for CI. The CPU reference lives in ``benchmarks/results/gpu_check_reference[_quick].json``;
``--device cpu --write-reference`` writes it (the full one takes ~15 minutes on 2 cores). Every run
appends its times, peak memory and largest differences to ``--out``; the exit status is 1 when a number
differs from the reference by more than its tolerance, 2 on bad arguments. Each run uses a fresh cache
folder (``--cache`` to reuse one), so C0 and the model export are measured on the device too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EIFFEL = ("The Eiffel Tower is located in the city of", "Eiffel Tower")
# absolute tolerances: probabilities from float32 kernels that sum in another order (trace, locate), and
# fractions of facts, where one fact flipping moves the number by 1/n (MEMIT's 100, WISE's 10 x prompts)
TOLERANCES = {"heatmap": 2e-3, "locate": 2e-3, "memit": 0.03, "wise": 0.1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when present), cuda:1, cpu")
    parser.add_argument("--device-map", default=None,
                        help="split over GPUs instead of --device: auto, balanced or a device count")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 2 facts, 1 edit: a CI-sized check")
    parser.add_argument("--write-reference", action="store_true", help="store this run as the CPU reference")
    parser.add_argument("--reference", type=Path, default=None, help="reference file (default by mode)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: a fresh one)")
    args = parser.parse_args(argv)
    if args.device is not None and args.device_map is not None:
        parser.error("pass either --device or --device-map")
    if args.device_map is not None and args.device_map.isdigit():
        args.device_map = int(args.device_map)
    if args.write_reference and (args.device or "cpu") != "cpu":
        parser.error("the reference is a CPU run: --write-reference needs --device cpu")
    if args.reference is None:
        args.reference = RESULTS / ("gpu_check_reference_quick.json" if args.quick else "gpu_check_reference.json")
    if not args.write_reference and not args.reference.is_file():
        parser.error(f"no reference at {args.reference}: run with --device cpu --write-reference first")
    return args


class Meter:
    """Wall time and peak memory of each phase (GPU: torch's peak allocation; CPU: the process's max RSS)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.phases: dict[str, dict] = {}

    def run(self, name: str, job):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = job()
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.phases[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_gib": round(peak, 3)}
        print(f"{name}: {self.phases[name]['seconds']} s, peak {self.phases[name]['peak_gib']} GiB", flush=True)
        return result


def run_jobs(model, quick: bool, meter: Meter) -> dict:
    """The four jobs' numbers, as plain lists and floats."""
    from editing import WiseConfig, create_editor, evaluate_accuracy, evaluate_counterfact, locality_predictions
    from editing.covariance import CorpusConfig
    from editing.memit import MemitConfig, apply_memit
    from tracing.causal_trace import TraceConfig, trace_prompt
    from tracing.facts import known_facts, one_per_subject, spread
    from tracing.locate import locate

    facts = spread(one_per_subject(known_facts()), 100)
    samples = 3 if quick else 10
    numbers: dict = {}

    trace = meter.run("heatmap", lambda: trace_prompt(model, *EIFFEL, config=TraceConfig(
        samples=samples, show_progress=False)))
    numbers["heatmap"] = {kind: trace.scores[kind].tolist() for kind in ("resid", "mlp", "attn")}

    located = meter.run("locate", lambda: locate(model, facts[: 2 if quick else 50], TraceConfig(
        kinds=("mlp",), samples=samples, show_progress=False), only_correct=not quick))
    effect = located.effects["mlp"]
    numbers["locate"] = {"mean_scores": effect.mean_scores.tolist(), "critical": list(located.critical.layers)}

    memit_facts = facts[: 1 if quick else 100]
    config = MemitConfig(show_progress=False)
    if quick:  # the tiny model has no packaged corpus or traced layers
        config = MemitConfig(layers=(1, 2), mom2_weight=1.0, show_progress=False,
                             corpus=CorpusConfig(samples=48, max_tokens=24, batch_size=16))
    edit = meter.run("memit", lambda: apply_memit(model, memit_facts, config))
    summary = evaluate_counterfact(model, memit_facts)
    numbers["memit"] = {key: summary.as_dict()[key] for key in ("ES", "PS", "NS")}
    edit.undo(model)

    wise_facts = facts[: 1 if quick else 10]
    baseline = locality_predictions(model, wise_facts)
    editor = create_editor("wise", model, WiseConfig(n_iter=10) if quick else WiseConfig())

    def stream():
        for fact in wise_facts:
            editor.edit(fact)

    meter.run("wise", stream)
    accuracy = evaluate_accuracy(model, wise_facts, baseline)
    editor.undo()
    numbers["wise"] = {"reliability": accuracy.reliability, "generalization": accuracy.generalization,
                       "locality": accuracy.locality}
    return numbers


def largest_differences(numbers: dict, reference: dict) -> dict[str, float]:
    """The largest absolute difference per job (NaN where both are NaN counts as equal; a changed choice
    of critical layers counts as infinite)."""
    import numpy as np

    worst = {}
    for job, values in numbers.items():
        diffs = [0.0]
        for key, value in values.items():
            expected = reference[job][key]
            if key == "critical":
                diffs.append(0.0 if list(value) == list(expected) else float("inf"))
                continue
            a = np.asarray(value if value is not None else np.nan, dtype=float)
            b = np.asarray(expected if expected is not None else np.nan, dtype=float)
            if a.shape != b.shape:
                diffs.append(float("inf"))
                continue
            both_nan = np.isnan(a) & np.isnan(b)
            diff = np.where(both_nan, 0.0, np.abs(a - b))
            diffs.append(float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0)
        worst[job] = max(diffs)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["FACTLENS_CACHE"] = str(args.cache or tempfile.mkdtemp(prefix="factlens-gpu-check-"))
    from tracing.models import load_model
    from tracing.placement import PlacementError

    name = "tiny-llama" if args.quick else "smollm2"
    device = args.device or ("cpu" if args.write_reference else None)
    try:
        # float32 everywhere: the check compares kernels, not precisions
        model = load_model(name, device=device, device_map=args.device_map, dtype="float32")
    except PlacementError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    where = str(model.cfg.device) if args.device_map is None else f"device_map={args.device_map}"
    meter = Meter(str(model.cfg.device))
    numbers = run_jobs(model, args.quick, meter)
    record = {"model": name, "quick": args.quick, "device": where, "n_devices": int(getattr(model.cfg, "n_devices", 1)),
              "phases": meter.phases, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    failed = False
    if args.write_reference:
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        args.reference.write_text(json.dumps({"record": record, "numbers": numbers}, indent=1))
        print(f"reference written to {args.reference}")
    else:
        reference = json.loads(args.reference.read_text())["numbers"]
        worst = largest_differences(numbers, reference)
        record["largest_difference"] = worst
        record["tolerance"] = TOLERANCES
        for job, diff in worst.items():
            verdict = "ok" if diff <= TOLERANCES[job] else "DIFFERS"
            failed |= verdict != "ok"
            print(f"{job}: largest difference from the CPU reference {diff:.3g} (tolerance {TOLERANCES[job]}) {verdict}")
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([*runs, record], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
