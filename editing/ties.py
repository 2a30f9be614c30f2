"""TIES merging (Yadav et al. 2023): many task vectors into one, keeping what they agree on.

Edits trained on different parameters (WISE's knowledge shards) or on the same ones can be merged; plain
averaging lets entries of opposite sign cancel and small entries dilute the large ones, so TIES trims
each vector to its largest entries, elects a sign per entry and averages only the agreeing ones.
"""

from __future__ import annotations

from typing import Sequence

import torch


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merge task vectors (Yadav et al. 2023): trim, elect a sign, take the disjoint mean.

    Each delta keeps its ``density`` fraction of largest-magnitude entries. Per entry, the sign of the
    weighted sum of the trimmed deltas is elected (0 counts as +); the result is the weighted mean over the
    deltas whose entry is non-zero with the elected sign, and 0 where there is none.
    """
    trimmed = torch.stack([_keep_largest(d, density) for d in deltas])
    w = torch.tensor(list(weights), dtype=trimmed.dtype, device=trimmed.device).view(-1, *[1] * (trimmed.ndim - 1))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(trimmed) == elected
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of largest-magnitude entries set to 0."""
    k = int(density * delta.numel())
    kept = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    kept[delta.abs().flatten().topk(k).indices] = True
    return delta * kept.view_as(delta)
