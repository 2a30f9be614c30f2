"""Resuming an interrupted sampled draw: the texts so far and the random generator's state, after every batch.

Sampling the C0 corpus from a model is the longest job before an edit of a model without a packaged draw
(10,000 texts of 64 tokens: about two hours on two CPU cores). A checkpoint holds the texts of the batches
done and the generator state after the last of them; its metadata names the run it belongs to (the
prompts' digest, lengths, sampling parameters, seed, batch size). A call that finds a checkpoint of the
same run restores the state and samples the remaining batches, so the draw equals an uninterrupted one's
(on the same machine and thread count, as any sampled draw). A checkpoint of another run is ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tracing.io import load_checkpoint_of, save_tensors_atomic

METADATA_KEY = "factlens_sampling_checkpoint"


@dataclass(frozen=True)
class SamplingProgress:
    """The texts sampled so far and the generators' states after them (CUDA's where the model is there)."""

    texts: list[str]
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None


def sampling_run(prompts: Sequence[str], **parameters) -> dict:
    """What identifies a draw: a digest of the prompts and every sampling parameter (JSON-able)."""
    digest = hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"prompts": digest, "n_prompts": len(prompts), **parameters}


def save_sampling(path: Path, progress: SamplingProgress, run: dict) -> None:
    """Write ``progress`` of ``run`` to ``path`` atomically (a kill mid-write leaves the previous one)."""
    tensors = {"cpu_rng": progress.cpu_rng.contiguous()}
    if progress.cuda_rng is not None:
        tensors["cuda_rng"] = progress.cuda_rng.contiguous()
    save_tensors_atomic(path, tensors, METADATA_KEY, {"run": run, "texts": progress.texts})


def load_sampling(path: Path, run: dict) -> SamplingProgress | None:
    """The progress saved at ``path`` by the same run, or None (no file, unreadable, or another run's)."""
    found = load_checkpoint_of(path, METADATA_KEY, run)
    if found is None:
        return None
    tensors, meta = found
    return SamplingProgress(list(meta["texts"]), tensors["cpu_rng"], tensors.get("cuda_rng"))
