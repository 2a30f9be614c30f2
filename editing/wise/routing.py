"""How WISE's router scores an input and picks a memory.

A side memory's activation score for a key x is ``||x Δᵀ||``: how far the memory would move the layer's
output. The router reads its running maximum (or mean) over the positions so far, so a position's
decision never depends on later tokens or padding, and sends the position to the memory furthest above
its threshold. The thresholds' floors are calibrated on held-out prompts (:func:`calibrated_floors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from editing.editor import Route

# Relative headroom of a floor over the scores it keeps out: a few float32 ulps, so that the same prompt
# scored again in another batch shape (or with another machine's kernels) still stays below it.
FLOOR_HEADROOM = 4 * torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Routing(Route):
    """Where one prompt is routed (``memory``: an index into :attr:`WiseEditor.memories`, None = the main
    memory), with each memory's score at the prompt's last token, the thresholds it was held to, and under
    ``route_match="subject"`` whether the prompt spells a subject of each memory (empty: every memory may
    be reached)."""

    scores: list[float]
    thresholds: list[float]
    eligible: list[bool] = field(default_factory=list)

    def margin(self, gated: bool = True) -> float:
        """The router's evidence for a side memory: the largest score-to-threshold ratio over the memories
        (routed when above 1), the memories the subject gate keeps out counting 0 unless ``gated`` is False
        (the score alone). 0 without memories."""
        allowed = self.eligible if gated and self.eligible else [True] * len(self.scores)
        ratios = (score / max(threshold, 1e-6) for score, threshold, ok
                  in zip(self.scores, self.thresholds, allowed) if ok)
        return max(ratios, default=0.0)


def running_score(scores: torch.Tensor, valid: torch.Tensor | None, kind: str,
                  carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing statistic at every position: max or mean of the per-token ``scores`` (..., b, s) over
    the valid positions so far. ``carry`` continues rows whose earlier positions were in a previous call
    (a KV-cached prefix); the second result is the carry for the next call."""
    weights = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    if kind == "max":  # scores are norms (>= 0), so a padded position's 0 never wins
        running = (scores * weights).cummax(-1).values
        if carry is not None:
            running = torch.maximum(running, carry[0][..., None])
        return running, running[..., -1][None]
    sums = (scores * weights).cumsum(-1)
    counts = weights.cumsum(-1).expand_as(sums)
    if carry is not None:
        sums, counts = sums + carry[0][..., None], counts + carry[1][..., None]
    return sums / counts.clamp(min=1.0), torch.stack([sums[..., -1], counts[..., -1]])


def row_score(scores: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """The routing statistic at the end of each right-padded row (its last valid position)."""
    if kind == "max":
        return (scores * valid).max(-1).values
    return masked_mean(scores, valid)


def common_directions(keys: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of the uncentred second moment E[k kᵀ] of ``keys`` (N, d_mlp), as
    columns (d_mlp, count). The first is close to the mean key: on SmolLM2's layer 25 it carries 24 % of
    generic text's key energy, and the keys of different fact prompts have mean cosine 0.35 with it and
    0.19 without it."""
    if count == 0:
        return keys.new_zeros(keys.shape[-1], 0)
    moment = keys.T.double() @ keys.double() / len(keys)
    _, vectors = torch.linalg.eigh(moment)
    return vectors[:, -count:].flip(1).to(keys.dtype).contiguous()


def without_common(keys: torch.Tensor, common: torch.Tensor | None) -> torch.Tensor:
    """Keys without their components along the orthonormal columns of ``common``: the side memories read
    only this part, so they cannot respond to what all prompts have in common."""
    if common is None or not common.shape[1]:
        return keys
    basis = common.to(keys.device, keys.dtype)
    return keys - (keys @ basis) @ basis.T


def activation_scores(keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-token activation score ``||x Δᵀ||`` for keys (..., d_mlp) and Δ (d_model, d_mlp)."""
    return torch.linalg.vector_norm(keys @ delta.T, dim=-1)


def decide(keys: torch.Tensor, valid: torch.Tensor | None, deltas: torch.Tensor, thresholds: torch.Tensor,
           kind: str, carry: torch.Tensor | None = None, choose: str = "ratio", gate: torch.Tensor | None = None):
    """For keys (b, s, d_mlp) and memories ``deltas`` (k, d_model, d_mlp): per memory the output change
    (k, b, s, d_model) and the running statistic (k, b, s); per position the chosen memory (of the memories
    above their thresholds, and allowed by ``gate`` (k, b, s) where one is given, the one furthest above as
    a ratio, or with ``choose="score"`` the one with the largest statistic, EasyEdit's rule; -1 = main
    memory); and the next carry."""
    change = torch.einsum("bsm,kdm->kbsd", keys.to(deltas.dtype), deltas)
    statistic, carry = running_score(torch.linalg.vector_norm(change, dim=-1), valid, kind, carry)
    eligible = statistic > thresholds[:, None, None]
    if gate is not None:
        eligible = eligible & gate.to(eligible.device)
    if choose == "score":
        margin = statistic
    else:  # how far above its own threshold
        margin = statistic / thresholds.clamp(min=1e-6)[:, None, None]
    best = margin.masked_fill(~eligible, -math.inf).argmax(0)
    return statistic, torch.where(eligible.any(0), best, torch.full_like(best, -1)), change, carry


def hinge_mean(hinge: torch.Tensor, violated_only: bool) -> torch.Tensor:
    """Mean of a margin's hinge values (ReLU outputs): over every entry, or with ``violated_only`` over the
    entries that violate the margin (the positive ones; 0 if none), as EasyEdit averages its margins."""
    if not violated_only:
        return hinge.mean()
    return hinge.sum() / (hinge > 0).sum().clamp(min=1)


def routed_output(value: torch.Tensor, choice: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The layer output ``value`` plus, at each position, the change of its chosen memory (none at -1)."""
    chosen = change.gather(0, choice.clamp(min=0)[None, ..., None].expand(1, *change.shape[1:]))[0]
    return torch.where((choice >= 0)[..., None], value + chosen.to(value.dtype), value)


def real_positions(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """Which positions of the hooked ``key`` batch are real tokens (None: all), from the attention mask the
    model was called with; a mask that does not match the batch (a block called directly) is ignored."""
    batch, length = key.shape[:2]
    if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
        return None
    return mask[:, -length:].bool()


def calibrated_floors(scores: torch.Tensor, scales: Sequence[float], quantile: float, mode: str) -> list[float]:
    """Each memory's threshold floor from its scores (M, N) on N calibration prompts.

    ``"memory"``: the ``quantile`` of each memory's own scores. ``"joint"``: one factor ``c`` for all, the
    quantile over the prompts of their largest score-to-scale ratio, times each memory's scale. A prompt at
    or below the quantile must stay out on any machine, and routing is ``score > threshold``, so a floor is
    never below the largest score it is meant to keep out (``c x scale`` alone can round a hair under the
    top prompt's own score), and it carries :data:`FLOOR_HEADROOM` on top.
    """
    if mode == "memory":
        floors = [float(torch.quantile(row, quantile)) for row in scores]
    else:
        ratios = scores / torch.tensor(scales, dtype=scores.dtype).clamp(min=1e-6)[:, None]
        ratio = torch.quantile(ratios.max(0).values, quantile)
        kept_out = ratios.max(0).values <= ratio  # the prompts this quantile keeps off every memory
        floors = [max(float(ratio) * max(scale, 1e-6), float(row[kept_out].max()) if kept_out.any() else 0.0)
                  for row, scale in zip(scores, scales)]
    return [floor * (1 + FLOOR_HEADROOM) for floor in floors]


def valid_mask(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    """(rows, longest row) booleans: which positions of the right-padded rows are real tokens."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the last dimension where ``mask`` holds (0 for a row without any)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
