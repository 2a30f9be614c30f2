"""Resuming an interrupted C0 measurement: the partial sums after every N batches, written atomically.

A checkpoint holds, per layer, Σ k kᵀ over the batches done so far, how many batches of the corpus
stream that covers (``next_batch``), and the token and text counts; its metadata names the run it
belongs to (model, layers, corpus, lengths, batch size, rank and world size). A run that finds a
checkpoint of the same run skips the batches it covers and adds the rest in the same order, so the
resumed sums equal an uninterrupted run's bit for bit. A checkpoint of another run is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tracing.io import load_checkpoint_of, save_tensors_atomic

METADATA_KEY = "factlens_key_stats_checkpoint"


@dataclass
class Progress:
    """Sums over the batches before ``next_batch`` (this rank's share of them)."""

    sums: dict[int, torch.Tensor]
    next_batch: int = 0
    tokens: int = 0
    texts: int = 0
    batches_done: int = field(default=0)  # batches this rank summed, for the checkpoint interval


def save_checkpoint(path: Path, progress: Progress, run: dict) -> None:
    """Write ``progress`` for the run described by ``run`` (JSON-able), atomically."""
    tensors = {f"layer{layer}": s.contiguous() for layer, s in progress.sums.items()}
    meta = {"run": run, "next_batch": progress.next_batch, "tokens": progress.tokens, "texts": progress.texts,
            "batches_done": progress.batches_done}
    save_tensors_atomic(path, tensors, METADATA_KEY, meta)


def load_checkpoint(path: Path, run: dict) -> Progress | None:
    """The progress saved at ``path`` by the same run, or None (no file, or another run's)."""
    found = load_checkpoint_of(path, METADATA_KEY, run)
    if found is None:
        return None
    tensors, meta = found
    sums = {int(name.removeprefix("layer")): tensor for name, tensor in tensors.items()}
    return Progress(sums, meta["next_batch"], meta["tokens"], meta["texts"], meta["batches_done"])
