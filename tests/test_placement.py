"""Device and dtype placement: the checks before loading, accelerate's split planned for GPUs that are not
here, a model dispatched by a device map, and tracing / MEMIT numbers in other dtypes (tiny models)."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from editing.memit import apply_memit
from tests.test_memit import REQUESTS, TINY_CONFIG, _next_token_prob
from tracing.adapter import ModelAdapter
from tracing.causal_trace import TraceConfig, trace_prompt
from tracing.models import load_model
from tracing.placement import PlacementError, input_device, model_dtype, plan_device_map, resolve_placement

GIB = 2**30
LLAMA_3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
LLAMA_3_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256)
TRACE = TraceConfig(samples=3, noise=1.0, show_progress=False, kinds=("resid", "mlp"))
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


@pytest.mark.parametrize("request_, message", [
    (dict(device="cuda"), "CUDA is not available here (use --device cpu)"),
    (dict(device="cuda:0"), "CUDA is not available here (use --device cpu)"),
    (dict(device="tpu9"), "is not a device"),
    (dict(device_map="auto"), "CUDA is not available here (use --device cpu)"),
    (dict(device_map=2), "asks for 2 CUDA devices, there are 0 here"),
    (dict(device_map="everywhere"), "expected one of"),
    (dict(device_map={"model.layers.0": 1}), "on CUDA device 1, there are 0 here"),
    (dict(device_map={"model.layers.0": "disk"}), "no disk or meta offload"),
    (dict(device="cpu", device_map="auto"), "not both"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'"),
])
def test_requests_that_cannot_work_here_are_refused_in_one_line(request_, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        resolve_placement(**request_, cuda_count=0)
    assert "\n" not in str(error.value)


def test_load_model_refuses_before_loading_anything():
    with pytest.raises(PlacementError, match="CUDA is not available here"):
        load_model("gpt-j", device="cuda")  # a 6B hub model: nothing is downloaded or read first


def test_defaults_follow_the_devices_present():
    on_gpu = resolve_placement(preferred_gpu_dtype=torch.bfloat16, cuda_count=1)
    assert on_gpu.device == torch.device("cuda") and on_gpu.dtype == torch.bfloat16 and not on_gpu.split
    on_cpu = resolve_placement(preferred_gpu_dtype=torch.bfloat16, cuda_count=0)
    assert on_cpu.device == torch.device("cpu") and on_cpu.dtype == torch.float32
    assert resolve_placement("cuda:1", "fp16", cuda_count=2).dtype == torch.float16
    split = resolve_placement(device_map=4, preferred_gpu_dtype=torch.bfloat16, cuda_count=4)
    assert split.device is None and split.n_devices == 4 and split.dtype == torch.bfloat16 and split.split
    assert resolve_placement(device_map="auto", cuda_count=2).device_map == "auto"


def _layer_devices(plan: dict[str, int], n_layers: int) -> list[int]:
    return [plan[f"model.layers.{layer}"] for layer in range(n_layers)]


def test_a_device_count_becomes_a_balanced_split_of_whole_blocks():
    plan = plan_device_map(LLAMA_3_8B, 2, torch.bfloat16, max_memory={0: 80 * GIB, 1: 80 * GIB})
    layers = _layer_devices(plan, 32)
    assert layers == sorted(layers) and set(layers) == {0, 1}  # consecutive blocks, both GPUs used
    assert 10 <= layers.count(0) <= 22  # balanced, not "fill GPU 0 first"
    assert plan["model.embed_tokens"] == 0 and plan["lm_head"] == 1  # inputs start on the first GPU
    assert set(plan.values()) == {0, 1}  # no module offloaded to cpu or disk


def test_a_70b_model_needs_a_split_in_bfloat16():
    with pytest.raises(PlacementError, match="does not fit on 1 device"):
        plan_device_map(LLAMA_3_70B, 1, torch.bfloat16, max_memory={0: 80 * GIB})
    plan = plan_device_map(LLAMA_3_70B, 2, torch.bfloat16, max_memory={0: 80 * GIB, 1: 80 * GIB})
    layers = _layer_devices(plan, 80)
    assert layers == sorted(layers) and set(layers) == {0, 1}


def test_a_dispatched_model_traces_exactly_like_a_placed_one(tiny_llama):
    everywhere = {name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    everywhere |= {f"model.layers.{layer}": "cpu" for layer in range(4)}
    dispatched = load_model("tiny-llama", device_map=everywhere)
    assert dispatched.original_model.hf_device_map == everywhere
    assert input_device(dispatched) == torch.device("cpu") and dispatched.cfg.n_devices == 1
    placed = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=TRACE)
    split = trace_prompt(dispatched, PROMPT, SUBJECT, config=TRACE)
    for kind in TRACE.kinds:
        np.testing.assert_array_equal(split.scores[kind], placed.scores[kind])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tracing_in_another_dtype_stays_finite_and_close_to_float32(tiny_llama, dtype):
    model = load_model("tiny-llama", device="cpu", dtype=dtype)
    assert model_dtype(model) == dtype
    reference = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=TRACE)
    for engine in ("fast", "reference"):
        trace = trace_prompt(model, PROMPT, SUBJECT, config=dataclasses.replace(TRACE, engine=engine))
        assert trace.engine == engine
        tolerance = 1e-5 if dtype == torch.float64 else 0.1
        for kind in TRACE.kinds:
            assert np.isfinite(trace.scores[kind]).all()
            np.testing.assert_allclose(trace.scores[kind], reference.scores[kind], atol=tolerance)


def test_memit_in_bfloat16_keeps_the_weights_dtype_and_moves_the_targets():
    # bfloat16, the GPU dtype; float64 fails earlier, in Hugging Face's generate with left padding (a fully
    # masked row's softmax is NaN there), while sampling MEMIT's context templates
    dtype = torch.bfloat16
    model = load_model("tiny-llama", device="cpu", dtype=dtype)
    adapter = ModelAdapter.of(model)
    before = [_next_token_prob(model, f.prompt, f.target_new) for f in REQUESTS]
    edit = apply_memit(model, REQUESTS, dataclasses.replace(TINY_CONFIG, mom2_weight=1.0))
    for layer in edit.layers:
        weight = adapter.down_projection(model, layer)
        assert weight.dtype == dtype and torch.isfinite(weight).all()
    after = [_next_token_prob(model, f.prompt, f.target_new) for f in REQUESTS]
    assert all(a > 2 * b for a, b in zip(after, before))
