"""Tracing speed by CPU time: our exact engine and the AtP scan against rome's per-cell loop on the plain HF model.

All in one run, on one prompt, with the same noise tensor for every engine:

* reference: a faithful loop of kmeng01/rome's algorithm (``rome_loop.py``: one forward of 1 clean + N
  corrupted rows per cell, torch hooks on the Hugging Face modules, no bridge);
* exact: ``trace_prompt(method="exact")`` (the fast engine through the bridge);
* scan: ``trace_prompt(method="atp")`` (attribution patching, one backward for every cell).

Times are ``time.process_time()`` (CPU seconds of all threads). The floating-point work is counted
analytically, 2 x (weights of the matrix multiplications) x (tokens through them), from the forwards, rows
and tokens each engine runs (attention's score/value products, norms and softmaxes are left out); the
achieved GFLOP/s per CPU second is set against a plain ``torch.matmul`` of the shape of one MLP projection
over the reference's batch, timed the same way. Writes ``--out`` (JSON) and prints a summary.

    python benchmarks/trace_speed.py [--model smollm2] [--samples 10] [--kinds resid,mlp,attn] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

KINDS = ("resid", "mlp", "attn")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "trace_speed.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--quick", action="store_true", help="mlp only, 3 noise samples (a smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.quick:
        args.kinds, args.samples = ("mlp",), 3
    if not args.kinds or any(k not in KINDS for k in args.kinds):
        parser.error(f"--kinds must be a comma-separated subset of {','.join(KINDS)}")
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.subject not in args.prompt:
        parser.error(f"the subject {args.subject!r} is not in the prompt")
    return args


def matmul_weights(hf_model) -> tuple[int, int]:
    """(weights of the matrix multiplications of all decoder layers, weights of the unembedding)."""
    from rome_loop import decoder_layers

    blocks = sum(p.numel() for layer in decoder_layers(hf_model) for p in layer.parameters() if p.dim() == 2)
    return blocks, hf_model.get_output_embeddings().weight.numel()


def reference_flops(block_w: int, head_w: int, n_tokens: int, forwards: int, rows: int) -> float:
    """rome: one clean forward (1 row), then ``forwards`` full forwards of ``rows`` rows (logits everywhere)."""
    return 2.0 * (block_w + head_w) * n_tokens * (1 + forwards * rows)


def exact_flops(block_w: int, head_w: int, n_layers: int, n_tokens: int, subject_start: int, samples: int,
                kinds, window: int) -> float:
    """Our fast engine (``tracing.engine.PrefixEngine``) on every cell: the answer's and the clean forward
    (1 row), the corrupted forward (N rows); per restored token t >= subject start one batch-1 pass of the
    suffix to capture block arguments, and per cell N rows of the suffix through the blocks from the cell's
    entry layer on, with logits at the last position only."""
    from tracing.engine import restored_layers

    per_layer = block_w / n_layers
    block_tokens = (2 + samples) * n_tokens * n_layers
    head_tokens = (2 + samples) * n_tokens
    for token in range(subject_start, n_tokens):
        suffix = n_tokens - token
        block_tokens += suffix * n_layers
        for kind in kinds:
            for layer in range(n_layers):
                entry = layer + 1 if kind == "resid" else restored_layers(kind, layer, n_layers, window).start
                block_tokens += samples * suffix * (n_layers - entry)
                head_tokens += samples
    return 2.0 * (per_layer * block_tokens + head_w * head_tokens)


def scan_flops(block_w: int, head_w: int, n_tokens: int, samples: int) -> float:
    """AtP: the answer's and the clean forward (1 row), the corrupted forward (N rows) and its backward to
    the activations only (weights are frozen: about one forward's work)."""
    return 2.0 * (block_w + head_w) * n_tokens * (2 + 2 * samples)


def matmul_gflops(rows: int, inner: int, outer: int, min_cpu_s: float = 1.0) -> float:
    """GFLOP/s per CPU second of ``torch.matmul`` of (rows, inner) x (inner, outer) in float32."""
    import time

    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    torch.matmul(a, b)
    repeats, started = 0, time.process_time()
    while time.process_time() - started < min_cpu_s:
        torch.matmul(a, b)
        repeats += 1
    return 2.0 * rows * inner * outer * repeats / (time.process_time() - started) / 1e9


def measure(args: argparse.Namespace) -> dict:
    import dataclasses
    import time

    import numpy as np
    import torch

    from rome_loop import rome_trace
    from tracing.atp_accuracy import compare_traces
    from tracing.causal_trace import TraceConfig, noise_std, trace_prompt
    from tracing.corruption import gaussian
    from tracing.models import load_hf_model, load_model
    from tracing.tokens import encode_with_offsets, subject_token_range

    bridge = load_model(args.model, device="cpu")
    hf_model, _ = load_hf_model(args.model)
    config = TraceConfig(kinds=args.kinds, samples=args.samples, verify=False, show_progress=False)
    trace_prompt(bridge, "The capital of France is", "France", config=config)  # warm-up, caches the noise std

    encoded = encode_with_offsets(bridge, args.prompt)
    subject = subject_token_range(encoded, args.subject)
    noise = gaussian(args.samples, subject[1] - subject[0], hf_model.config.hidden_size,
                     noise_std(bridge, config), config.seed).delta

    started = time.process_time()
    reference = rome_trace(hf_model, encoded.ids, subject, noise, args.kinds, config.window)
    reference_s = time.process_time() - started
    started = time.process_time()
    exact = trace_prompt(bridge, args.prompt, args.subject, config=config)
    exact_s = time.process_time() - started
    started = time.process_time()
    scan = trace_prompt(bridge, args.prompt, args.subject, config=dataclasses.replace(config, method="atp"))
    scan_s = time.process_time() - started

    if exact.answer_id != reference.answer_id:
        raise RuntimeError("the exact engine and the rome loop traced different answers")
    n_tokens, n_layers = exact.n_tokens, exact.n_layers
    max_diff = max(float(np.abs(exact.scores[k] - reference.scores[k]).max()) for k in args.kinds)
    block_w, head_w = matmul_weights(hf_model)
    flops = {"reference": reference_flops(block_w, head_w, n_tokens, reference.forwards, reference.rows),
             "exact": exact_flops(block_w, head_w, n_layers, n_tokens, subject[0], args.samples, args.kinds,
                                  config.window),
             "scan": scan_flops(block_w, head_w, n_tokens, args.samples)}
    seconds = {"reference": reference_s, "exact": exact_s, "scan": scan_s}
    inner = hf_model.config.hidden_size
    outer = getattr(hf_model.config, "intermediate_size", None) or 4 * inner
    peak = matmul_gflops((args.samples + 1) * n_tokens, inner, outer)
    achieved = {name: flops[name] / seconds[name] / 1e9 for name in flops}
    pearson = {kind: compare_traces([exact], [scan], kind).pearson for kind in args.kinds}
    return {
        "model": args.model, "prompt": args.prompt, "subject": args.subject, "answer": exact.answer,
        "kinds": list(args.kinds), "samples": args.samples, "n_tokens": n_tokens, "n_layers": n_layers,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "atp_space": config.atp_space, "reference_cpu_s": reference_s, "exact_cpu_s": exact_s, "scan_cpu_s": scan_s,
        "exact_vs_reference": reference_s / exact_s, "scan_vs_exact": exact_s / scan_s,
        "max_abs_diff": max_diff, "scan_pearson_mlp": pearson.get("mlp"), "scan_pearson": pearson,
        "gflop": {name: value / 1e9 for name, value in flops.items()},
        "gflop_per_cpu_s": achieved, "matmul_gflop_per_cpu_s": peak,
        "matmul_shape": [(args.samples + 1) * n_tokens, inner, outer],
        "share_of_matmul": {name: value / peak for name, value in achieved.items()},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    record = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['model']}: {record['n_tokens']} tokens x {record['n_layers']} layers x {len(record['kinds'])} "
          f"kinds, {record['samples']} samples, torch threads {record['torch_threads']}")
    for name in ("reference", "exact", "scan"):
        print(f"{name:9s} {record[name + '_cpu_s']:9.2f} CPU s  {record['gflop'][name]:9.1f} GFLOP  "
              f"{record['gflop_per_cpu_s'][name]:6.1f} GFLOP/s ({record['share_of_matmul'][name]:.0%} of matmul)")
    print(f"matmul {record['matmul_shape']}: {record['matmul_gflop_per_cpu_s']:.1f} GFLOP/s per CPU s")
    print(f"exact vs rome loop: {record['exact_vs_reference']:.1f}x (goal >= 8x), max |diff| "
          f"{record['max_abs_diff']:.1e} (goal <= 1e-5); scan vs exact: {record['scan_vs_exact']:.1f}x, "
          f"Pearson r (mlp) {record['scan_pearson_mlp']}")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
