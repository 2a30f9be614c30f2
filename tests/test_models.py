import tempfile
from pathlib import Path

import pytest
import torch

import tracing.models as models
from tracing.adapter import ModelAdapter
from tracing.models import ModelUnavailableError, UnknownModelError, load_model, resolve_model_name


def test_the_suite_never_touches_the_users_cache(monkeypatch):
    suite = models.cache_dir().resolve()
    monkeypatch.delenv("FACTLENS_CACHE")
    users = {models.cache_dir().resolve(), (Path.home() / ".cache" / "factlens").resolve()}
    for user in users:  # tests/conftest.py sets FACTLENS_CACHE to a temporary folder for the session
        assert suite != user and user not in suite.parents and suite not in user.parents
    assert suite.name.startswith("factlens-test-cache-") and suite.is_relative_to(Path(tempfile.gettempdir()).resolve())


def test_aliases_resolve_to_hub_ids():
    assert resolve_model_name("gpt-j").hub_id == "EleutherAI/gpt-j-6B"
    assert resolve_model_name("GPT2-XL").hub_id == "gpt2-xl"
    assert resolve_model_name("EleutherAI/gpt-j-6B").name == "gpt-j"
    assert resolve_model_name("someone/some-model").source == "hub"
    assert resolve_model_name("llama-2-7b").prepend_bos is True
    assert resolve_model_name("smollm2").prepend_bos is False


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError, match="gpt2-xl"):
        resolve_model_name("not-a-model")


def test_hub_model_without_network_explains_the_cause(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as error:
        load_model("gpt-j", device="cpu")
    message = str(error.value)
    assert "EleutherAI/gpt-j-6B" in message and "network" in message and "smollm2" in message


def test_tiny_models_share_one_adapter(tiny_model):
    adapter = ModelAdapter.of(tiny_model)
    assert adapter.n_layers == 4 and adapter.d_model == 64
    weight = adapter.read_down_projection(tiny_model, 1)
    assert weight.shape == (adapter.d_model, adapter.d_mlp)
    # the (d_model, d_mlp) view maps a key to what the down projection outputs (bias removed)
    key = torch.randn(adapter.d_mlp)
    module = tiny_model.blocks[1].mlp.out.original_component
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    with torch.no_grad():
        expected = module(key[None]) - bias
    torch.testing.assert_close(weight @ key, expected[0], rtol=1e-4, atol=1e-5)
    assert tiny_model.cfg.default_prepend_bos is False


def test_tiny_models_are_reproducible():
    a, b = load_model("tiny-llama", seed=3), load_model("tiny-llama", seed=3)
    c = load_model("tiny-llama", seed=4)
    wa, wb, wc = (ModelAdapter.of(m).read_down_projection(m, 0) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.embedded
def test_embedded_model_loads_from_safetensors_cache(embedded, monkeypatch):
    assert ModelAdapter.of(embedded).n_layers == 30 and embedded.cfg.d_model == 576
    assert (models.embedded_export_dir() / "model.safetensors").is_file()

    def no_gguf(*_args, **_kwargs):
        raise AssertionError("the GGUF file was read although a safetensors export exists")

    monkeypatch.setattr(models, "_export_embedded", no_gguf)
    again = load_model("smollm2", device="cpu")
    torch.testing.assert_close(
        ModelAdapter.of(again).read_down_projection(again, 7),
        ModelAdapter.of(embedded).read_down_projection(embedded, 7),
    )


def test_hub_model_with_no_route_to_the_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*_args, **_kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    with pytest.raises(ModelUnavailableError, match="no network connection to huggingface.co"):
        load_model("gpt2-xl", device="cpu")
