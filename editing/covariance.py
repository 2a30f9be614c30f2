"""The key second moment C0 = E[k kᵀ] that MEMIT protects while editing.

k is the input of an MLP down-projection (one vector per token). MEMIT measures C0, uncentred, over
100k Wikipedia texts; here the corpus is the user's choice:

* ``"model"`` (offline default): text sampled from the model itself, from a fixed set of openers. For the
  embedded model the default draw (seed 0, 1000 x 64 tokens) ships with the package
  (``editing/data/corpora/``, written by :func:`write_packaged_corpus`): sampling it takes about 9 minutes
  on 2 CPU cores, longer than everything else in a first MEMIT edit together;
* a path: a ``.txt`` file (paragraphs separated by blank lines), a ``.jsonl``/``.json`` file with a
  ``"text"`` field, or a folder of ``.txt`` files;
* ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset's ``text`` column (needs network).

Statistics are accumulated as a running sum of ``Kᵀ K`` per batch (memory: one d_mlp x d_mlp matrix per
layer, never per token), in one forward pass for all requested layers that stops after the deepest one,
and cached on disk per (model, layer, corpus, sample count, text length).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tracing.adapter import ModelAdapter
from tracing.io import atomic_path, write_json_atomic
from tracing.models import ModelUnavailableError, cache_dir, model_spec
from tracing.tokens import encode

PACKAGED_CORPORA = Path(__file__).parent / "data" / "corpora"

OPENERS = (
    "The", "In", "A", "It", "When", "This", "He", "She", "They", "We", "After", "One of the",
    "According to", "There are", "Many", "If", "During the", "Most", "Some", "History",
)


@dataclass(frozen=True)
class CorpusConfig:
    """Which text C0 is measured on, and how much of it."""

    source: str = "model"
    samples: int = 1000
    max_tokens: int = 64
    seed: int = 0
    batch_size: int = 32


def corpus_id(corpus: CorpusConfig) -> str:
    """A stable name for the corpus, part of every cache key (content-hashed for local files)."""
    if corpus.source == "model":
        return f"model-sampled-seed{corpus.seed}"
    if corpus.source.startswith("hf:"):
        return "hf-" + corpus.source[3:].replace("/", "_").replace(":", "-")
    path = Path(corpus.source)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def corpus_texts(model, corpus: CorpusConfig, show_progress: bool = True) -> list[str]:
    if corpus.source == "model":
        return _sampled_texts(model, corpus, show_progress)
    if corpus.source.startswith("hf:"):
        return _hub_texts(corpus)
    path = Path(corpus.source)
    if not path.exists():
        raise FileNotFoundError(f"corpus {corpus.source!r} is neither 'model', 'hf:<dataset>', nor an existing path")
    texts = list(_local_texts(path))
    if not texts:
        raise ValueError(f"corpus {path} contains no text")
    return texts[: corpus.samples]


def _local_texts(path: Path) -> Iterable[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        if file.suffix in (".jsonl", ".json"):
            text = file.read_text(encoding="utf-8")
            records = json.loads(text) if text.lstrip().startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
            yield from (r["text"] for r in records if r.get("text", "").strip())
        else:
            paragraphs = file.read_text(encoding="utf-8", errors="replace").split("\n\n")
            yield from (p.strip() for p in paragraphs if p.strip())


def _hub_texts(corpus: CorpusConfig) -> list[str]:
    name, _, config = corpus.source[3:].partition(":")
    try:
        from datasets import load_dataset

        stream = load_dataset(name, config or None, split="train", streaming=True)
        texts = []
        for record in stream:
            if record.get("text", "").strip():
                texts.append(record["text"])
            if len(texts) >= corpus.samples:
                break
        return texts
    except Exception as error:  # datasets raises many types for network/offline failures
        raise ModelUnavailableError(
            f"could not stream the Hugging Face dataset {name!r} ({type(error).__name__}: {error}). "
            "Without network use corpus 'model' (text sampled from the model) or a local text file."
        ) from error


def _sampled_texts(model, corpus: CorpusConfig, show_progress: bool) -> list[str]:
    """Texts sampled from the model: the packaged draw where one matches, else sampled once and cached on
    disk, so every run measures the same statistics."""
    packaged = packaged_corpus_path(model, corpus)
    if packaged.is_file():
        return json.loads(gzip.decompress(packaged.read_bytes()).decode("utf-8"))
    path = cache_dir() / "corpora" / model_spec(model).name / _sampled_name(corpus, ".json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    texts = sample_corpus(model, corpus, show_progress)
    write_json_atomic(path, texts)
    return texts


def _sampled_name(corpus: CorpusConfig, suffix: str) -> str:
    return f"{corpus_id(corpus)}-n{corpus.samples}-t{corpus.max_tokens}{suffix}"


def packaged_corpus_path(model, corpus: CorpusConfig) -> Path:
    """Where the packaged draw of ``corpus`` for this model would be (it exists for the embedded model's
    default)."""
    return PACKAGED_CORPORA / model_spec(model).name / _sampled_name(corpus, ".json.gz")


def sample_corpus(model, corpus: CorpusConfig, show_progress: bool = True) -> list[str]:
    """``corpus.samples`` continuations of ``corpus.max_tokens`` tokens, nucleus-sampled (p = 0.95) under
    ``corpus.seed`` from the openers in turn."""
    from editing.generate import sample_continuations

    prompts = [OPENERS[i % len(OPENERS)] for i in range(corpus.samples)]
    return sample_continuations(model, prompts, corpus.max_tokens, top_p=0.95, seed=corpus.seed,
                                batch_size=max(corpus.batch_size, 64), show_progress=show_progress,
                                desc="sampling C0 corpus")


def write_packaged_corpus(model, corpus: CorpusConfig = CorpusConfig()) -> Path:
    """Sample ``corpus`` from ``model`` and write it where :func:`corpus_texts` finds it first (gzipped
    JSON, deterministic bytes). How the embedded model's shipped draw was made."""
    texts = sample_corpus(model, corpus, show_progress=True)
    path = packaged_corpus_path(model, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(json.dumps(texts, ensure_ascii=False, indent=0).encode("utf-8"), mtime=0))
    return path


def _stats_path(model, layer: int, corpus: CorpusConfig) -> Path:
    return (cache_dir() / "stats" / model_spec(model).name / corpus_id(corpus) /
            f"mlp_key_mom2_layer{layer}_n{corpus.samples}_t{corpus.max_tokens}.safetensors")


def key_second_moments(model, layers: Iterable[int], corpus: CorpusConfig = CorpusConfig(),
                       show_progress: bool = True) -> dict[int, torch.Tensor]:
    """C0 = E[k kᵀ] (float32, d_mlp x d_mlp) for each layer, from the disk cache or one new pass."""
    layers = sorted(set(layers))
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = _stats_path(model, layer, corpus)
        if path.is_file():
            stored = load_file(str(path))
            result[layer] = stored["mom2"] / stored["count"]
        else:
            missing.append(layer)
    if missing:
        texts = corpus_texts(model, corpus, show_progress)
        sums, count = _accumulate(model, missing, texts, corpus, show_progress)
        for layer in missing:
            with atomic_path(_stats_path(model, layer, corpus)) as tmp:
                save_file({"mom2": sums[layer], "count": torch.tensor(float(count))}, str(tmp))
            result[layer] = sums[layer] / count
    return result


@torch.no_grad()
def _accumulate(model, layers: list[int], texts: list[str], corpus: CorpusConfig,
                show_progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    adapter = ModelAdapter.of(model)
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    sums = {layer: torch.zeros(adapter.d_mlp, adapter.d_mlp, device=device) for layer in layers}
    count = 0
    valid: torch.Tensor | None = None

    def accumulator(layer: int):
        def accumulate(key: torch.Tensor, hook) -> None:
            rows = key[valid].float()
            sums[layer] += rows.T @ rows
        return accumulate

    hooks = [(adapter.mlp_key(layer), accumulator(layer)) for layer in layers]
    encoded = [ids[: corpus.max_tokens] for ids in (encode(model, t) for t in texts) if ids]
    batches = range(0, len(encoded), corpus.batch_size)
    for start in tqdm(batches, desc="key statistics", disable=not show_progress, leave=False):
        batch = encoded[start: start + corpus.batch_size]
        width = max(len(ids) for ids in batch)
        tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
        valid = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in batch], device=device)
        # right padding: real tokens never attend to the pads after them, so no attention mask is needed
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=max(layers) + 1)
        count += int(valid.sum())
    if count == 0:
        raise ValueError("the corpus produced no tokens")
    return {layer: s.cpu() for layer, s in sums.items()}, count
