"""WISE's side memories: Δ = W_side - W_main with the scores it was edited to, in knowledge shards that
are TIES-merged, and how they are written to and read from a file.

Each shard trains a random fraction of Δ's entries (a new mask per shard), so shards mostly touch
different parameters and merge with little interference. WISE-Retrieve keeps each merge as its own
memory; WISE-Merge folds every merge into one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from editing.ties import ties_merge


@dataclass
class SideMemory:
    """One side memory: Δ = W_side - W_main as (d_model, d_mlp), and the scores it was edited to."""

    delta: torch.Tensor
    min_act: float = math.inf  # smallest in-scope score recorded at the end of an edit (inf: none yet)
    n_edits: int = 0
    floor: float = 0.0  # threshold floor calibrated on prompts it was never trained on
    in_scores: list[float] = field(default_factory=list)  # per edit: its in-scope score when it was made
    calibration_scores: torch.Tensor | None = field(default=None, repr=False, compare=False)  # cache

    @property
    def scale(self) -> float:
        """The typical score of its edits (their median): what the joint calibration divides by."""
        if self.in_scores:
            return float(torch.tensor(self.in_scores).median())
        return self.min_act if math.isfinite(self.min_act) else 1.0


def new_shard(shape: tuple[int, ...], mask_ratio: float, seed: int, n_edits: int) -> tuple[SideMemory, torch.Tensor]:
    """A fresh side memory (Δ = 0: a copy of the main memory) and a new random mask of trainable entries,
    drawn from the seed and the number of edits so far (reproducible, new per shard)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_edits)
    mask = torch.rand(shape, generator=generator) < mask_ratio
    return SideMemory(torch.zeros(shape)), mask


def merged(group: Sequence[SideMemory], weights: Sequence[float], density: float) -> SideMemory:
    """TIES of a group of memories; it answers to all their edits, so its threshold is their lowest."""
    delta = ties_merge([m.delta for m in group], weights, density)
    return SideMemory(delta, min(m.min_act for m in group), sum(m.n_edits for m in group),
                      in_scores=[score for m in group for score in m.in_scores])


def merge_shards(stored: list[SideMemory], per_merge: int, retrieve: bool, already_merged: bool,
                 density: float) -> tuple[list[SideMemory], bool]:
    """The stored memories after a merge, and whether ``stored[0]`` is now WISE-Merge's merged memory.

    Retrieve: TIES the last ``per_merge`` shards into one memory. Merge: TIES everything into the one
    memory, the previous merge weighing 0.6 and the new shards sharing 0.4 (EasyEdit's weights)."""
    if retrieve:
        group = stored[-per_merge:]
        return stored[:-per_merge] + [merged(group, [1.0 / len(group)] * len(group), density)], already_merged
    if already_merged:
        group = stored[1:] + stored[:1]
        weights = [0.4 / (len(group) - 1)] * (len(group) - 1) + [0.6]
    else:
        group, weights = list(stored), [1.0 / len(stored)] * len(stored)
    return [merged(group, weights, density)], True


def memory_record(memory: SideMemory) -> dict:
    """What a file keeps of a memory besides its Δ (JSON-safe)."""
    return {"min_act": finite_or_none(memory.min_act), "n_edits": memory.n_edits, "floor": memory.floor,
            "in_scores": memory.in_scores}


def memory_from_record(delta: torch.Tensor, record: dict) -> SideMemory:
    """The memory a file's Δ and :func:`memory_record` describe."""
    return SideMemory(delta, inf_if_none(record["min_act"]), record["n_edits"], record.get("floor", 0.0),
                      list(record.get("in_scores", [])))


def to_saved(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as it is saved: float32, on the CPU, contiguous."""
    return tensor.detach().to("cpu", torch.float32).contiguous()


def finite_or_none(value: float) -> float | None:
    """A score as JSON keeps it: infinity (no edit yet) as None."""
    return value if math.isfinite(value) else None


def inf_if_none(value: float | None) -> float:
    """The inverse of :func:`finite_or_none`."""
    return math.inf if value is None else value
