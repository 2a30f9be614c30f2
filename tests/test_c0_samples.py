"""benchmarks/c0_samples.py and what it rests on: C0 over prefixes of one corpus in one pass, and MEMIT
with given targets and C0 (a tiny model and a local corpus of 45 texts, so nothing is sampled)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import weights_digest
from editing.covariance import CorpusConfig, corpus_texts, measure_key_stats, prefix_key_stats
from editing.memit import MemitConfig, apply_memit, memit_targets
from editing.targets import TargetConfig
from tracing.facts import known_facts, one_per_subject, spread

_SPEC = importlib.util.spec_from_file_location("c0_samples", Path(__file__).parent.parent / "benchmarks" / "c0_samples.py")
c0_samples = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(c0_samples)


def _config(corpus: str) -> MemitConfig:
    return MemitConfig(layers=(1, 2), corpus=CorpusConfig(source=corpus, samples=45, max_tokens=24, batch_size=16),
                       targets=TargetConfig(steps=5), show_progress=False)


def test_prefix_sums_equal_measuring_each_prefix(tiny_llama, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    corpus = _config(text_corpus).corpus
    texts = corpus_texts(tiny_llama, corpus, show_progress=False)
    prefixes = list(prefix_key_stats(tiny_llama, [2, 1], texts, [20, 8, 45], corpus, show_progress=False))
    assert [p.texts for p in prefixes] == [8, 20, 45]
    assert prefixes[0].tokens < prefixes[1].tokens < prefixes[2].tokens
    for prefix in prefixes:
        alone = measure_key_stats(tiny_llama, [1, 2], dataclasses.replace(corpus, samples=prefix.texts),
                                  show_progress=False)
        for layer in (1, 2):
            torch.testing.assert_close(prefix.c0[layer], alone[layer], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(prefixes[0].c0[1], prefixes[1].c0[1], rtol=1e-3)
    with pytest.raises(ValueError, match="must lie in 1..45"):
        next(prefix_key_stats(tiny_llama, [1], texts, [46], corpus, show_progress=False))


def test_given_targets_and_c0_give_the_edit_computed_from_scratch(tiny_llama, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    facts = spread(one_per_subject(known_facts()), 3)
    config = _config(text_corpus)
    scratch = apply_memit(tiny_llama, facts, config)
    scratch.undo(tiny_llama)
    c0 = measure_key_stats(tiny_llama, [1, 2], config.corpus, show_progress=False)
    given = apply_memit(tiny_llama, facts, config, targets=memit_targets(tiny_llama, facts, config), c0=c0)
    given.undo(tiny_llama)
    for layer in (1, 2):
        torch.testing.assert_close(given.deltas[layer], scratch.deltas[layer])
    assert given.config["corpus"] == "given"
    with pytest.raises(ValueError, match="targets of shape"):
        apply_memit(tiny_llama, facts, config, targets=torch.zeros(2, 64), c0=c0)
    with pytest.raises(ValueError, match=r"c0 lacks the edited layers \[2\]"):
        apply_memit(tiny_llama, facts, config, targets=torch.zeros(3, 64), c0={1: c0[1]})


def test_sweep_writes_one_row_per_count_and_restores_the_weights(tiny_llama, text_corpus, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    facts = spread(one_per_subject(known_facts()), 3)
    out = tmp_path / "c0.json"
    before = weights_digest(tiny_llama)
    config = dataclasses.replace(_config(text_corpus), mom2_weight=1.0)
    record = c0_samples.sweep(tiny_llama, facts, [16, 8, 100], config, out, model_name="tiny-llama", threads=1)
    assert weights_digest(tiny_llama) == before
    assert json.loads(out.read_text()) == record
    # the corpus holds 45 texts: the sweep stops there and says so
    assert record["corpus"]["asked"] == 100 and record["corpus"]["available"] == 45
    assert "holds 45 texts, fewer than 100" in capsys.readouterr().out
    rows = record["rows"]
    assert [row["samples"] for row in rows] == [8, 16, 45]
    for row in rows:
        assert set(c0_samples.COLUMNS) <= set(row) and row["weights_restored"]
        assert 0 <= row["ES"] <= 1 and 0 <= row["NS"] <= 1 and len(row["load_average"]) == 3
    assert rows[0]["tokens"] < rows[1]["tokens"] < rows[2]["tokens"]
    assert rows[0]["c0_seconds"] <= rows[1]["c0_seconds"] <= rows[2]["c0_seconds"]
    # more samples, another C0, another update
    for a, b in zip(rows, rows[1:]):
        assert a["update_norms"].keys() == {"1", "2"}
        assert all(abs(a["update_norms"][k] - b["update_norms"][k]) > 1e-4 * a["update_norms"][k] for k in ("1", "2"))
    assert record["facts"] == 3 and record["layers"] == [1, 2] and record["mom2_weight"] == 1.0
    assert record["model"] == "tiny-llama" and record["threads"] == 1 and record["unedited"]["n_cases"] == 3
    lines = c0_samples.table(record).splitlines()
    assert len(lines) == 2 + 3 and lines[1].strip().startswith("unedited")


def test_sample_counts_on_the_command_line():
    assert c0_samples.parser().parse_args([]).samples == [100, 300, 1000, 3000, 10000]
    assert c0_samples.parser().parse_args(["--samples", "5,50", "-n", "7"]).n_edits == 7
    for bad in ("ten", "0,5", ""):
        with pytest.raises(SystemExit):
            c0_samples.parser().parse_args(["--samples", bad])
