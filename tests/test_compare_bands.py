"""editing.compare_bands: the candidate bands, and MEMIT edits at each of them on a tiny model (a local C0
corpus, so no corpus is sampled from the model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import weights_digest
from editing.compare_bands import (BAND_NAMES, Band, candidate_bands, compare_bands, first_band, main, mid_band,
                                   random_band)
from editing.covariance import CorpusConfig
from editing.memit import MemitConfig
from tracing.causal_trace import TraceConfig
from tracing.facts import known_facts, one_per_subject, spread

TRACE = TraceConfig(kinds=("mlp",), samples=2, show_progress=False)


def _memit(corpus: str) -> MemitConfig:
    return MemitConfig(corpus=CorpusConfig(source=corpus, samples=48, max_tokens=24, batch_size=16), mom2_weight=1.0,
                       show_progress=False)


@pytest.mark.parametrize("n_layers, width", [(4, 2), (28, 6), (30, 5), (48, 5), (12, 12)])
def test_bands_have_one_width_and_their_places(n_layers, width):
    critical = Band("critical", tuple(range(1, 1 + width)) if width < n_layers else tuple(range(width)))
    bands = {band.name: band.layers for band in candidate_bands(BAND_NAMES, n_layers, critical, seed=7)}
    assert list(bands) == list(BAND_NAMES) and {len(layers) for layers in bands.values()} == {width}
    assert bands["first"][0] == 0 and bands["critical"] == critical.layers
    for layers in bands.values():
        assert layers == tuple(range(layers[0], layers[0] + width)) and 0 <= layers[0] <= layers[-1] < n_layers
    if width < n_layers // 2:  # room to centre it: the mid band's centre is within half a layer of a third
        assert abs(np.mean(bands["mid"]) - n_layers / 3) <= 0.5


def test_random_band_follows_its_seed():
    assert random_band(30, 5, seed=3) == random_band(30, 5, seed=3)
    starts = {random_band(30, 5, seed)[0] for seed in range(40)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 25


def test_a_band_wider_than_the_model_is_refused():
    for make in (lambda: first_band(4, 5), lambda: mid_band(4, 0), lambda: random_band(4, 5, 0)):
        with pytest.raises(ValueError, match="does not fit a 4-layer model"):
            make()


def test_edits_at_each_band_from_the_unedited_model(tiny_llama, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))  # no critical layers known: the trace chooses
    facts = spread(one_per_subject(known_facts()), 3)
    seed = next(s for s in range(100) if random_band(4, 2, s) == (0, 1))  # the random band is the first band
    before = weights_digest(tiny_llama)
    comparison = compare_bands(tiny_llama, facts, ("first", "mid", "random", "critical"), width=2, seed=seed,
                               memit=_memit(text_corpus), trace=TRACE, only_correct=False)
    assert weights_digest(tiny_llama) == before
    results = {r.band.name: r for r in comparison.results}
    assert list(results) == ["first", "mid", "random", "critical"]
    assert results["first"].band.layers == (0, 1) and results["mid"].band.layers == (1, 2)
    assert results["critical"].band.detail.startswith("traced in this run")
    # each band's edit starts from the unedited model: the same band twice gives the same scores
    assert results["random"].scores == results["first"].scores
    assert comparison.unedited["n_cases"] == 3 and all(r.scores["n_cases"] == 3 for r in comparison.results)
    for result in comparison.results:
        layers = list(result.band.layers)
        assert result.single_layer_aie == pytest.approx(np.mean(np.array(comparison.single_layer_curve)[layers]))
        assert result.windowed_aie == pytest.approx(np.mean(np.array(comparison.windowed_curve)[layers]))
    lines = comparison.table().splitlines()
    assert len(lines) == 2 + 1 + 4 and lines[2].startswith("| unedited |")
    assert "mean single-layer AIE" in lines[0] and "| ES | PS | NS |" in lines[0]


def test_command_writes_table_json_and_figure(tiny_llama, text_corpus, tmp_path, monkeypatch, capsys):
    import tracing.models as models

    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    before = weights_digest(tiny_llama)
    out = tmp_path / "out"
    assert main(["tiny-llama", "-n", "2", "--band-width", "2", "--bands", "critical,first,mid", "--samples", "2",
                 "--include-wrong", "--corpus", text_corpus, "--corpus-samples", "48", "--mom2-weight", "1",
                 "--out-dir", str(out)]) == 0
    assert weights_digest(tiny_llama) == before
    printed = capsys.readouterr().out
    table = (out / "compare_bands.md").read_text()
    assert table.strip() in printed and len(table.strip().splitlines()) == 2 + 1 + 3
    record = json.loads((out / "compare_bands.json").read_text())
    assert [r["band"]["name"] for r in record["results"]] == ["critical", "first", "mid"]
    assert [r["band"]["layers"] for r in record["results"]][1:] == [[0, 1], [1, 2]]
    assert len(record["single_layer_curve"]) == len(record["windowed_curve"]) == 4 and len(record["facts"]) == 2
    assert (out / "compare_bands.png").stat().st_size > 10_000
