"""The tracing speed benchmark: rome's per-cell loop on the plain HF model gives our exact engine's numbers,
the analytic FLOP counts of the rome loop and of the exact engine equal the work their nn.Linear calls really
do, and the JSON record has the promised keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trace_speed  # noqa: E402
from rome_loop import rome_trace  # noqa: E402
from tracing.causal_trace import TraceConfig, noise_std, trace_prompt  # noqa: E402
from tracing.corruption import gaussian  # noqa: E402
from tracing.models import load_hf_model  # noqa: E402
from tracing.tokens import encode_with_offsets, subject_token_range  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


@pytest.fixture(scope="module")
def plain_llama():
    return load_hf_model("tiny-llama")[0]


def _same_noise(model, config: TraceConfig):
    encoded = encode_with_offsets(model, PROMPT)
    subject = subject_token_range(encoded, SUBJECT)
    noise = gaussian(config.samples, subject[1] - subject[0], model.cfg.d_model, noise_std(model, config), config.seed).delta
    return encoded.ids, subject, noise


def test_rome_loop_on_the_plain_model_equals_the_exact_engine(tiny_llama, plain_llama):
    config = TraceConfig(samples=3, verify=False, show_progress=False)
    ids, subject, noise = _same_noise(tiny_llama, config)
    reference = rome_trace(plain_llama, ids, subject, noise, config.kinds, config.window)
    exact = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=config)
    assert reference.answer_id == exact.answer_id
    assert abs(reference.corrupted_prob - exact.corrupted_prob) < 1e-6
    for kind in config.kinds:
        assert np.abs(reference.scores[kind] - exact.scores[kind]).max() <= 1e-5
        # some restored cell moves p(answer), so equal heatmaps are not two constant ones
        assert np.abs(reference.scores[kind] - reference.corrupted_prob).max() > 1e-4


def test_reference_flop_count_is_the_work_of_its_matmuls(tiny_llama, plain_llama):
    config = TraceConfig(kinds=("mlp",), samples=2, verify=False, show_progress=False)
    ids, subject, noise = _same_noise(tiny_llama, config)
    counted = [0.0]

    def count(module, args, output):
        counted[0] += 2.0 * module.in_features * module.out_features * args[0].numel() / module.in_features

    handles = [m.register_forward_hook(count) for m in plain_llama.modules() if isinstance(m, torch.nn.Linear)]
    try:
        reference = rome_trace(plain_llama, ids, subject, noise, config.kinds, config.window)
    finally:
        for handle in handles:
            handle.remove()
    block_w, head_w = trace_speed.matmul_weights(plain_llama)
    expected = trace_speed.reference_flops(block_w, head_w, len(ids), reference.forwards, reference.rows)
    assert counted[0] == pytest.approx(expected, rel=1e-9)


def test_exact_flop_count_is_the_work_of_the_bridge_matmuls(tiny_llama, plain_llama):
    config = TraceConfig(samples=3, verify=False, show_progress=False)
    trace_prompt(tiny_llama, "The capital of France is", "France", config=config)  # warm-up: noise std cached
    counted = [0.0]

    def count(module, args, output):
        counted[0] += 2.0 * module.out_features * args[0].numel()

    handles = [m.register_forward_hook(count) for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear)]
    try:
        trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=config)
    finally:
        for handle in handles:
            handle.remove()
    block_w, head_w = trace_speed.matmul_weights(plain_llama)
    expected = trace_speed.exact_flops(block_w, head_w, trace.n_layers, trace.n_tokens, trace.subject_range[0],
                                       config.samples, config.kinds, config.window)
    assert counted[0] == pytest.approx(expected, rel=1e-9)


def test_benchmark_writes_the_record(tmp_path):
    out = tmp_path / "speed.json"
    trace_speed.main(["--model", "tiny-llama", "--quick", "--out", str(out)])
    record = json.loads(out.read_text())
    for key in ("reference_cpu_s", "exact_cpu_s", "scan_cpu_s", "exact_vs_reference", "scan_vs_exact",
                "max_abs_diff", "scan_pearson_mlp"):
        assert key in record
    assert record["max_abs_diff"] <= 1e-5
    assert record["exact_vs_reference"] == pytest.approx(record["reference_cpu_s"] / record["exact_cpu_s"])
    assert record["gflop"]["exact"] < record["gflop"]["reference"]
    assert -1.0 <= record["scan_pearson_mlp"] <= 1.0


@pytest.mark.parametrize("argv", [["--kinds", "resid,nope"], ["--samples", "0"], ["--subject", "Louvre"]])
def test_bad_options_exit_with_status_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        trace_speed.parse_args(argv)
    assert exit_info.value.code == 2
