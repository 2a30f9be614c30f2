"""C0 that users can live with: a token budget, resuming a killed run, statistics files that describe
themselves and are refused for another model or layer, and the command line that measures and shares them."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import editing.covariance as covariance
from editing.covariance import CorpusConfig, key_second_moments, stats_path, stream_texts, token_batches
from editing.stats_checkpoint import METADATA_KEY as CHECKPOINT_KEY
from editing.stats_file import StatsInfo, StatsMismatchError, read_key_stats, save_key_stats
from tracing.io import load_tensors
from tracing.tokens import encode

ROOT = Path(__file__).parents[1]

# the child measures C0 with a pause after each batch, so that the test can kill it between checkpoints
CHILD = """
import json, sys, time
from editing.covariance import CorpusConfig, key_second_moments
from tracing.models import load_model
model = load_model("tiny-llama", device="cpu")
forward = model.run_with_hooks
def slow(*args, **kwargs):
    time.sleep(0.3)
    return forward(*args, **kwargs)
model.run_with_hooks = slow
key_second_moments(model, [1, 2], CorpusConfig(**json.loads(sys.argv[1])), show_progress=False)
"""


def test_a_killed_run_resumes_where_it_stopped(tiny_llama, text_corpus, tmp_path, monkeypatch):
    corpus = CorpusConfig(source=text_corpus, samples=45, max_tokens=12, batch_size=3, checkpoint_every=2)
    n_batches = 15
    killed_cache = tmp_path / "killed"
    env = {**os.environ, "FACTLENS_CACHE": str(killed_cache), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(corpus))], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(killed_cache.rglob("checkpoint_*.safetensors")):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    [checkpoint] = killed_cache.rglob("checkpoint_*.safetensors")
    done = load_tensors(checkpoint, CHECKPOINT_KEY)[1]["next_batch"]
    assert done in (2, 4, 6) and not list(killed_cache.rglob("mlp_key_mom2_layer*"))  # stopped mid-run

    forwards = []
    run_with_hooks = tiny_llama.run_with_hooks
    monkeypatch.setattr(tiny_llama, "run_with_hooks", lambda *a, **k: forwards.append(1) or run_with_hooks(*a, **k))
    monkeypatch.setenv("FACTLENS_CACHE", str(killed_cache))
    resumed = key_second_moments(tiny_llama, [1, 2], corpus, show_progress=False)
    assert len(forwards) == n_batches - done  # the batches before the checkpoint were not run again
    assert not checkpoint.exists()

    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "whole"))
    whole = key_second_moments(tiny_llama, [1, 2], dataclasses.replace(corpus, checkpoint_every=0), show_progress=False)
    assert len(forwards) == 2 * n_batches - done
    for layer in (1, 2):  # the same additions in the same order: equal bit for bit
        assert torch.equal(resumed[layer], whole[layer])


def test_a_token_budget_cuts_the_stream(tiny_llama, text_corpus):
    corpus = CorpusConfig(source=text_corpus, samples=45, max_tokens=12, batch_size=4)
    free = [ids for batch in token_batches(tiny_llama, stream_texts(tiny_llama, corpus), corpus) for ids in batch]
    capped = [ids for batch in token_batches(tiny_llama, stream_texts(tiny_llama, corpus),
                                             dataclasses.replace(corpus, token_budget=100)) for ids in batch]
    assert len(free) == 45 and all(0 < len(ids) <= 12 for ids in free)
    assert max(len(ids) for ids in free) == 12  # the cap did cut texts
    assert sum(map(len, capped)) == 100
    assert capped[:-1] == free[: len(capped) - 1] and capped[-1] == free[len(capped) - 1][: len(capped[-1])]
    assert free[0] == encode(tiny_llama, next(stream_texts(tiny_llama, corpus)))[:12]


def test_statistics_files_describe_themselves_and_load_from_a_path(tiny_llama, text_corpus, tmp_path, monkeypatch):
    corpus = CorpusConfig(source=text_corpus, samples=20, max_tokens=10, batch_size=8, token_budget=150)
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "measured"))
    measured = key_second_moments(tiny_llama, [1, 2], corpus, show_progress=False)
    path = stats_path(tiny_llama, 2, corpus)
    c0, info = read_key_stats(path)
    assert torch.equal(c0, measured[2])
    assert info == StatsInfo(model="tiny-llama", layer=2, d_mlp=128, corpus=covariance.corpus_id(corpus),
                             source=text_corpus, texts=info.texts, tokens=150, max_tokens=10, token_budget=150,
                             dtype="float32", model_dtype="float32", version=1, factlens=info.factlens)
    assert 10 < info.texts <= 20

    # another machine: an empty cache, the shared file given by path, nothing measured
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(covariance, "measure_key_stats", lambda *a, **k: pytest.fail("measured instead of loaded"))
    loaded = key_second_moments(tiny_llama, [2], CorpusConfig(), show_progress=False, files=[path])
    assert torch.equal(loaded[2], measured[2])

    total = c0 * info.tokens
    other_model = save_key_stats(tmp_path / "gpt2.safetensors", total, dataclasses.replace(info, model="tiny-gpt2"))
    with pytest.raises(StatsMismatchError, match=r"holds C0 of tiny-gpt2 layer 2 .* not statistics of tiny-llama"):
        key_second_moments(tiny_llama, [2], files=[other_model])
    with pytest.raises(StatsMismatchError, match=r"holds C0 of tiny-llama layer 2 .* layer 1, 3;"):
        key_second_moments(tiny_llama, [1, 3], files=[path])
    bare = tmp_path / "bare.safetensors"
    save_file({"mom2": total, "count": torch.tensor(150.0)}, str(bare))
    with pytest.raises(StatsMismatchError, match="does not describe itself"):
        key_second_moments(tiny_llama, [2], files=[bare])


def test_the_command_line_measures_and_shares(text_corpus, tmp_path, monkeypatch, capsys):
    """(Its refusals of bad arguments are cases of tests/test_bad_inputs.py.)"""
    from editing.key_stats import main

    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    assert main(["tiny-llama", "--layers", "1,2", "--corpus", text_corpus, "--samples", "12", "--max-tokens", "8",
                 "--out", str(tmp_path / "shared")]) == 0
    shared = sorted((tmp_path / "shared").iterdir())
    assert [read_key_stats(p)[1].layer for p in shared] == [1, 2]
    assert "C0 of tiny-llama layer 1 (d_mlp 128) over 12 texts" in capsys.readouterr().out
