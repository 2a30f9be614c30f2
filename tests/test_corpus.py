"""The C0 corpus: sampled draws are reproducible, and a packaged draw is read instead of sampling."""

import gzip
import json

import pytest

import editing.covariance as covariance
import editing.generate
from editing.covariance import CorpusConfig, corpus_texts, packaged_corpus_path, write_packaged_corpus

SMALL = CorpusConfig(samples=6, max_tokens=5, batch_size=4)


def _refuse_sampling(*args, **kwargs):
    raise AssertionError("the corpus was sampled although a draw was packaged or cached")


def test_a_packaged_draw_is_read_instead_of_sampled(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(covariance, "PACKAGED_CORPORA", tmp_path / "corpora")
    path = write_packaged_corpus(tiny_llama, SMALL)
    assert path == packaged_corpus_path(tiny_llama, SMALL) and path.suffixes[-2:] == [".json", ".gz"]
    written = json.loads(gzip.decompress(path.read_bytes()))
    assert len(written) == SMALL.samples and all(isinstance(t, str) and t for t in written)
    assert path.read_bytes() == gzip.compress(gzip.decompress(path.read_bytes()), mtime=0)  # no timestamp
    # the same draw as sampling would give, and sampling is not called any more
    assert written == covariance.sample_corpus(tiny_llama, SMALL, show_progress=False)
    monkeypatch.setattr(editing.generate, "sample_continuations", _refuse_sampling)
    assert corpus_texts(tiny_llama, SMALL, show_progress=False) == written
    # another seed has no packaged draw: it is sampled
    with pytest.raises(AssertionError, match="was sampled"):
        corpus_texts(tiny_llama, CorpusConfig(samples=6, max_tokens=5, seed=1), show_progress=False)


@pytest.mark.embedded
def test_the_embedded_model_ships_its_default_draw(embedded, monkeypatch):
    monkeypatch.setattr(editing.generate, "sample_continuations", _refuse_sampling)
    texts = corpus_texts(embedded, CorpusConfig(), show_progress=False)
    assert packaged_corpus_path(embedded, CorpusConfig()).is_file()
    assert len(texts) == CorpusConfig().samples and len(set(texts)) > 0.95 * len(texts)
    openers = covariance.OPENERS
    assert all(t.startswith(openers[i % len(openers)]) for i, t in enumerate(texts))
