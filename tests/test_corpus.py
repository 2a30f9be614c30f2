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


class _Killed(Exception):
    pass


def test_a_killed_draw_resumes_after_its_last_batch(tiny_llama, tmp_path, monkeypatch):
    from editing.generate import sample_continuations
    from editing.sampling_checkpoint import load_sampling, sampling_run

    prompts = [f"opener {i % 3}" for i in range(10)]  # 4 batches of 3, the last of 1
    kwargs = dict(top_p=0.95, seed=3, batch_size=3)
    uninterrupted = sample_continuations(tiny_llama, prompts, 6, **kwargs)
    checkpoint = tmp_path / "draw.partial.safetensors"
    generate = type(tiny_llama.original_model).generate
    calls = []

    def killed_after_two(self, *args, **kw):
        if len(calls) == 2:
            raise _Killed
        calls.append(1)
        return generate(self, *args, **kw)

    monkeypatch.setattr(type(tiny_llama.original_model), "generate", killed_after_two)
    with pytest.raises(_Killed):
        sample_continuations(tiny_llama, prompts, 6, checkpoint=checkpoint, **kwargs)
    saved = load_sampling(checkpoint, sampling_run(prompts, max_new_tokens=6, top_k=None, top_p=0.95, seed=3,
                                                   batch_size=3))
    assert saved is not None and saved.texts == uninterrupted[:6]  # the two batches done, nothing more
    # another run's checkpoint (another seed) is not taken for this one
    assert load_sampling(checkpoint, sampling_run(prompts, max_new_tokens=6, top_k=None, top_p=0.95, seed=4,
                                                  batch_size=3)) is None
    calls.clear()
    monkeypatch.setattr(type(tiny_llama.original_model), "generate", lambda self, *a, **kw: (calls.append(1), generate(self, *a, **kw))[1])
    resumed = sample_continuations(tiny_llama, prompts, 6, checkpoint=checkpoint, **kwargs)
    assert resumed == uninterrupted and len(calls) == 2  # only the two remaining batches were sampled
    assert len(set(uninterrupted)) > 3  # sampled, not one text repeated (the check above could not pass idly)


def test_a_killed_corpus_draw_resumes_and_leaves_only_the_cached_draw(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(covariance, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(covariance, "PACKAGED_CORPORA", tmp_path / "packaged")
    corpus = CorpusConfig(samples=66, max_tokens=3, seed=2)  # batches of 64: 64, 2
    expected = covariance.sample_corpus(tiny_llama, corpus, show_progress=False)
    generate = type(tiny_llama.original_model).generate
    calls = []

    def killed_after_one(self, *args, **kw):
        if calls:
            raise _Killed
        calls.append(1)
        return generate(self, *args, **kw)

    monkeypatch.setattr(type(tiny_llama.original_model), "generate", killed_after_one)
    with pytest.raises(_Killed):
        corpus_texts(tiny_llama, corpus, show_progress=False)
    folder = tmp_path / "corpora" / next((tmp_path / "corpora").iterdir()).name
    assert [p.name for p in folder.iterdir()] == [covariance._sampled_name(corpus, ".partial.safetensors")]
    monkeypatch.setattr(type(tiny_llama.original_model), "generate", generate)
    assert corpus_texts(tiny_llama, corpus, show_progress=False) == expected
    assert [p.name for p in folder.iterdir()] == [covariance._sampled_name(corpus, ".json")]
