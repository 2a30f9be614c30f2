"""The key second moment C0 = E[k kᵀ] that MEMIT protects while editing.

k is the input of an MLP down-projection (one vector per token). MEMIT measures C0, uncentred, over
100k Wikipedia texts; here the corpus is the user's choice:

* ``"model"`` (offline default): text sampled from the model itself, from a fixed set of openers. For the
  embedded model the default draw (seed 0, 1000 x 64 tokens) ships with the package
  (``editing/data/corpora/``, written by :func:`write_packaged_corpus`): sampling it takes about 9 minutes
  on 2 CPU cores, longer than everything else in a first MEMIT edit together. Another draw is sampled
  once, cached, and resumable: a killed draw continues after its last batch
  (:mod:`editing.sampling_checkpoint`);
* a path: a ``.txt`` file (paragraphs separated by blank lines), a ``.jsonl``/``.json`` file with a
  ``"text"`` field, or a folder of ``.txt`` files;
* ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset's ``text`` column (needs network).

Every corpus is streamed (texts read as they are needed), each text cut to ``max_tokens`` tokens, and the
whole stopped at ``token_budget`` tokens if one is given. Statistics are accumulated as a running sum of
``Kᵀ K`` per batch (memory: one d_mlp x d_mlp matrix per layer, never per token), in one forward pass for
all requested layers that stops after the deepest one, with a progress bar and ETA, checkpointed every
``checkpoint_every`` batches (:mod:`editing.stats_checkpoint`; a killed run resumes where it stopped),
sharded over the ranks of a ``torch.distributed`` process group (``torchrun -m editing.key_stats``), and
cached on disk per (model, layer, corpus, sample count, text length, token budget) in files that describe
themselves (:mod:`editing.stats_file`), so they can be shared and loaded from a path.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from editing.stats_checkpoint import Progress, load_checkpoint, save_checkpoint
from editing.stats_file import StatsInfo, StatsMismatchError, factlens_version, load_key_stats, save_key_stats
from tracing.adapter import ModelAdapter
from tracing.distributed import all_reduce_sum, barrier, world
from tracing.io import atomic_path, write_json_atomic
from tracing.models import ModelUnavailableError, cache_dir, model_spec
from tracing.placement import input_device, model_dtype
from tracing.tokens import encode

PACKAGED_CORPORA = Path(__file__).parent / "data" / "corpora"

OPENERS = (
    "The", "In", "A", "It", "When", "This", "He", "She", "They", "We", "After", "One of the",
    "According to", "There are", "Many", "If", "During the", "Most", "Some", "History",
)


@dataclass(frozen=True)
class CorpusConfig:
    """Which text C0 is measured on, and how much of it.

    ``samples`` texts at most, each cut to ``max_tokens`` tokens, and ``token_budget`` tokens in all (the
    last text is cut to fit; None: no budget). ``checkpoint_every``: batches between checkpoints of the
    partial sums (0: none), from which an interrupted measurement resumes.
    """

    source: str = "model"
    samples: int = 1000
    max_tokens: int = 64
    seed: int = 0
    batch_size: int = 32
    token_budget: int | None = None
    checkpoint_every: int = 50


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
    """The first ``corpus.samples`` texts of the corpus, as a list (see :func:`stream_texts`)."""
    return list(stream_texts(model, corpus, show_progress))


def stream_texts(model, corpus: CorpusConfig, show_progress: bool = True) -> Iterator[str]:
    """The first ``corpus.samples`` texts of the corpus, read lazily: a folder or a Hugging Face dataset
    is never held in memory whole. Sampled text is drawn once and cached (or read from the package)."""
    if corpus.source == "model":
        yield from _sampled_texts(model, corpus, show_progress)
        return
    if corpus.source.startswith("hf:"):
        yield from _hub_texts(corpus)
        return
    path = Path(corpus.source)
    if not path.exists():
        raise FileNotFoundError(f"corpus {corpus.source!r} is neither 'model', 'hf:<dataset>', nor an existing path")
    empty = True
    for text in itertools.islice(_local_texts(path), corpus.samples):
        empty = False
        yield text
    if empty:
        raise ValueError(f"corpus {path} contains no text")


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


def _hub_texts(corpus: CorpusConfig) -> Iterator[str]:
    name, _, config = corpus.source[3:].partition(":")
    try:
        from datasets import load_dataset

        stream = load_dataset(name, config or None, split="train", streaming=True)
        texts = (record["text"] for record in stream if record.get("text", "").strip())
        yield from itertools.islice(texts, corpus.samples)
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
    partial = path.with_name(_sampled_name(corpus, ".partial.safetensors"))  # a killed draw resumes from it
    texts = sample_corpus(model, corpus, show_progress, checkpoint=partial)
    write_json_atomic(path, texts)
    partial.unlink(missing_ok=True)
    return texts


def _sampled_name(corpus: CorpusConfig, suffix: str) -> str:
    return f"{corpus_id(corpus)}-n{corpus.samples}-t{corpus.max_tokens}{suffix}"


def packaged_corpus_path(model, corpus: CorpusConfig) -> Path:
    """Where the packaged draw of ``corpus`` for this model would be (it exists for the embedded model's
    default)."""
    return PACKAGED_CORPORA / model_spec(model).name / _sampled_name(corpus, ".json.gz")


def sample_corpus(model, corpus: CorpusConfig, show_progress: bool = True, checkpoint: Path | None = None) -> list[str]:
    """``corpus.samples`` continuations of ``corpus.max_tokens`` tokens, nucleus-sampled (p = 0.95) under
    ``corpus.seed`` from the openers in turn; resumable from ``checkpoint`` (written after every batch)."""
    from editing.generate import sample_continuations

    prompts = [OPENERS[i % len(OPENERS)] for i in range(corpus.samples)]
    return sample_continuations(model, prompts, corpus.max_tokens, top_p=0.95, seed=corpus.seed,
                                batch_size=max(corpus.batch_size, 64), show_progress=show_progress,
                                desc="sampling C0 corpus", checkpoint=checkpoint)


def write_packaged_corpus(model, corpus: CorpusConfig = CorpusConfig()) -> Path:
    """Sample ``corpus`` from ``model`` and write it where :func:`corpus_texts` finds it first (gzipped
    JSON, deterministic bytes). How the embedded model's shipped draw was made."""
    texts = sample_corpus(model, corpus, show_progress=True)
    path = packaged_corpus_path(model, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(json.dumps(texts, ensure_ascii=False, indent=0).encode("utf-8"), mtime=0))
    return path


def stats_path(model, layer: int, corpus: CorpusConfig) -> Path:
    """Where the cached statistics of ``layer`` over ``corpus`` are (or will be)."""
    return _stats_folder(model, corpus) / f"mlp_key_mom2_layer{layer}_{_length_name(corpus)}.safetensors"


def _stats_folder(model, corpus: CorpusConfig) -> Path:
    return cache_dir() / "stats" / model_spec(model).name / corpus_id(corpus)


def _length_name(corpus: CorpusConfig) -> str:
    budget = f"_b{corpus.token_budget}" if corpus.token_budget is not None else ""
    return f"n{corpus.samples}_t{corpus.max_tokens}{budget}"


def key_second_moments(model, layers: Iterable[int], corpus: CorpusConfig = CorpusConfig(),
                       show_progress: bool = True, files: Sequence[str | os.PathLike] = ()) -> dict[int, torch.Tensor]:
    """C0 = E[k kᵀ] (float32, d_mlp x d_mlp) for each layer: from ``files`` (shared statistics files,
    refused if they are of another model or of a layer not asked for), the disk cache, or one new pass
    (:func:`measure_key_stats`)."""
    layers = sorted(set(layers))
    result = load_key_stats_files(model, layers, files)
    missing = []
    for layer in layers:
        if layer in result:
            continue
        path = stats_path(model, layer, corpus)
        if path.is_file():
            stored = load_file(str(path))
            result[layer] = stored["mom2"] / stored["count"]
        else:
            missing.append(layer)
    if missing:
        result.update(measure_key_stats(model, missing, corpus, show_progress))
    return result


def load_key_stats_files(model, layers: Sequence[int], files: Sequence[str | os.PathLike]) -> dict[int, torch.Tensor]:
    """C0 by layer from shared statistics files, each checked against the model and ``layers``."""
    found: dict[int, torch.Tensor] = {}
    for path in files:
        c0, info = load_key_stats(path, model_spec(model).name, layers, ModelAdapter.of(model).d_mlp)
        if info.layer in found:
            raise StatsMismatchError(f"two statistics files for layer {info.layer} (the second is '{path}')")
        found[info.layer] = c0
    return found


def measure_key_stats(model, layers: Sequence[int], corpus: CorpusConfig = CorpusConfig(),
                      show_progress: bool = True) -> dict[int, torch.Tensor]:
    """Measure C0 for ``layers`` in one pass over the corpus stream and cache it (self-describing files,
    :mod:`editing.stats_file`).

    Under ``torch.distributed`` rank r sums the batches r, r + world, ...; the sums and counts are
    all-reduced, so every rank returns C0 of the whole corpus (equal to one process's up to float32
    rounding of the order of addition), and rank 0 writes the files. Every ``corpus.checkpoint_every``
    batches each rank saves its partial sums; a run of the same measurement resumes from them."""
    layers = sorted(set(layers))
    current = world()
    run = {"model": model_spec(model).name, "layers": layers, "corpus": corpus_id(corpus),
           "samples": corpus.samples, "max_tokens": corpus.max_tokens, "token_budget": corpus.token_budget,
           "batch_size": corpus.batch_size, "rank": current.rank, "world": current.size}
    checkpoint = _stats_folder(model, corpus) / (
        f"checkpoint_layers{'-'.join(map(str, layers))}_{_length_name(corpus)}_bs{corpus.batch_size}"
        f"_rank{current.rank}of{current.size}.safetensors")
    d_mlp = ModelAdapter.of(model).d_mlp
    progress = load_checkpoint(checkpoint, run) or Progress({layer: torch.zeros(d_mlp, d_mlp) for layer in layers})
    batches = token_batches(model, stream_texts(model, corpus, show_progress), corpus)
    budget = corpus.token_budget
    unit, total = ("token", min(budget, corpus.samples * corpus.max_tokens)) if budget else ("text", corpus.samples)
    with tqdm(total=math.ceil(total / current.size), initial=progress.tokens if budget else progress.texts,
              unit=unit, desc="key statistics", disable=not (show_progress and current.is_main),
              leave=False) as bar:
        save = (lambda p: save_checkpoint(checkpoint, p, run)) if corpus.checkpoint_every else None
        progress = _accumulate(model, layers, batches, corpus, progress, save, bar)
    sums = {layer: all_reduce_sum(progress.sums[layer]) for layer in layers}
    tokens, texts = (int(n) for n in all_reduce_sum(torch.tensor([progress.tokens, progress.texts])))
    if tokens == 0:
        raise ValueError("the corpus produced no tokens")
    if current.is_main:
        weights_dtype = str(model_dtype(model)).removeprefix("torch.")
        for layer in layers:
            info = StatsInfo(model_spec(model).name, layer, d_mlp, corpus_id(corpus), corpus.source, texts, tokens,
                             corpus.max_tokens, budget, str(sums[layer].dtype).removeprefix("torch."), weights_dtype,
                             factlens=factlens_version())
            save_key_stats(stats_path(model, layer, corpus), sums[layer], info)
    barrier()  # the statistics are on disk before any rank lets its checkpoint go
    checkpoint.unlink(missing_ok=True)
    return {layer: sums[layer] / tokens for layer in layers}


@dataclass(frozen=True)
class PrefixStats:
    """C0 by layer over the first ``texts`` texts of a corpus (``tokens`` tokens)."""

    texts: int
    tokens: int
    c0: dict[int, torch.Tensor]


def prefix_key_stats(model, layers: Iterable[int], texts: Sequence[str], counts: Iterable[int],
                     corpus: CorpusConfig = CorpusConfig(), show_progress: bool = True) -> Iterator[PrefixStats]:
    """C0 over the first S of ``texts`` for each S in ``counts``, in one pass: the sums of one prefix are
    carried into the next, so all counts together cost what the largest costs alone. Lazy (the caller can
    time each prefix and use it before the next is summed), one process, not cached; ``corpus`` gives the
    text length and batch size. Equal to :func:`measure_key_stats` over the same texts up to float32
    rounding (batches break at every count)."""
    layers, counts = sorted(set(layers)), sorted(set(counts))
    if corpus.token_budget is not None:
        raise ValueError("prefix_key_stats counts texts, not tokens: give a corpus without token_budget")
    if world().size > 1:
        raise ValueError("prefix_key_stats runs in one process (measure_key_stats shards over ranks)")
    if not counts or counts[0] < 1 or counts[-1] > len(texts):
        raise ValueError(f"counts {counts} must lie in 1..{len(texts)} (the texts given)")
    d_mlp = ModelAdapter.of(model).d_mlp
    progress = Progress({layer: torch.zeros(d_mlp, d_mlp) for layer in layers})
    done = 0
    with tqdm(total=counts[-1], unit="text", desc="key statistics", disable=not show_progress, leave=False) as bar:
        for count in counts:
            progress.next_batch = 0  # the batch index restarts with each slice of texts
            batches = token_batches(model, texts[done:count], corpus)
            progress = _accumulate(model, layers, batches, corpus, progress, None, bar)
            done = count
            if progress.tokens == 0:
                raise ValueError(f"the first {count} texts hold no tokens")
            yield PrefixStats(count, progress.tokens, {layer: s / progress.tokens for layer, s in progress.sums.items()})


def token_batches(model, texts: Iterable[str], corpus: CorpusConfig) -> Iterator[list[list[int]]]:
    """Token ids of ``texts`` in batches of ``corpus.batch_size``: each text cut to ``max_tokens``, texts
    without tokens left out, and the stream stopped (its last text cut) at ``token_budget`` tokens."""
    budget = corpus.token_budget
    used = 0
    batch: list[list[int]] = []
    for text in texts:
        ids = encode(model, text)[: corpus.max_tokens]
        if budget is not None:
            ids = ids[: budget - used]
        if not ids:
            continue
        used += len(ids)
        batch.append(ids)
        if len(batch) == corpus.batch_size:
            yield batch
            batch = []
        if budget is not None and used >= budget:
            break
    if batch:
        yield batch


@torch.no_grad()
def _accumulate(model, layers: list[int], batches: Iterable[list[list[int]]], corpus: CorpusConfig,
                progress: Progress, save: Callable[[Progress], None] | None, bar) -> Progress:
    """Add Kᵀ K of this rank's batches after ``progress.next_batch`` to ``progress.sums``; ``save`` it every
    ``corpus.checkpoint_every`` batches."""
    adapter = ModelAdapter.of(model)
    device = input_device(model)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    sums = {layer: progress.sums[layer].to(device) for layer in layers}
    current = world()
    valid: torch.Tensor | None = None

    def accumulator(layer: int):
        def accumulate(key: torch.Tensor, hook) -> None:
            rows = key[valid].float()
            sums[layer] += rows.T @ rows
        return accumulate

    hooks = [(adapter.mlp_key(layer), accumulator(layer)) for layer in layers]
    for index, batch in enumerate(batches):
        if index < progress.next_batch or index % current.size != current.rank:
            continue  # summed before an interruption, or another rank's
        width = max(len(ids) for ids in batch)
        tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
        valid = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in batch], device=device)
        # right padding: real tokens never attend to the pads after them, so no attention mask is needed
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=max(layers) + 1)
        n_tokens = int(valid.sum())
        progress.tokens += n_tokens
        progress.texts += len(batch)
        progress.next_batch = index + 1
        progress.batches_done += 1
        bar.update(n_tokens if corpus.token_budget else len(batch))
        if save is not None and progress.batches_done % corpus.checkpoint_every == 0:
            progress.sums = {layer: s.cpu() for layer, s in sums.items()}
            save(progress)
    progress.sums = {layer: s.cpu() for layer, s in sums.items()}
    return progress
