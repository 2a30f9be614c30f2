"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys.

Same target vectors z, keys and residual spread as MEMIT (:func:`editing.memit.apply_memit`); only the
per-layer solve differs. With P = U_s U_sᵀ, U_s the eigenvectors of C0 = E[k kᵀ] that span its null space,
and C_prev the summed K Kᵀ of every earlier call's keys at that layer:

    ΔWᵀ = solve(P (K Kᵀ + C_prev) + L2 I, P K Rᵀ)

so ΔW k ≈ 0 for keys in C0's span (what the layer normally sees) and for the keys of earlier edits, which a
later call therefore leaves alone. After each call its keys join C_prev (AlphaEdit's ``cache_c``).

Which eigenvectors span the "null space": the released code keeps those with eigenvalue below an absolute
2e-2, a number set for GPT-2 XL / GPT-J / Llama3-8B keys. On SmolLM2 that rule leaves 30-65 % of the keys'
energy E‖k‖² in the "null space" of four of its five edited layers (docs/alphaedit.md), so the projection
protects less than on the papers' models. ``nullspace_energy`` is the relative alternative: the smallest
eigen-directions that together hold at most that fraction of the trace. At 1 % it leaves 52-545 directions
per layer and the edits stop being written (T = 10: Rel 0.15), so the default stays the papers' rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from editing.memit import MemitConfig, apply_memit
from editing.weight_editor import WeightEditor
from editing.weights import WeightEdit, load_edit_sequence, load_edit_state, save_edit_sequence
from tracing.facts import Fact


@dataclass(frozen=True)
class AlphaEditConfig(MemitConfig):
    """MEMIT's settings plus AlphaEdit's as released (L2 = 10; null space = C0's eigenvectors with eigenvalues
    below ``nullspace_threshold`` = 2e-2). ``nullspace_energy`` (with ``nullspace_threshold=None``) takes
    instead the smallest eigen-directions holding at most that fraction of C0's trace."""

    nullspace_threshold: float | None = 2e-2
    nullspace_energy: float | None = None
    l2: float = 10.0

    def __post_init__(self) -> None:
        if (self.nullspace_threshold is None) == (self.nullspace_energy is None):
            raise ValueError("set exactly one of nullspace_threshold and nullspace_energy")
        if self.nullspace_energy is not None and not 0.0 <= self.nullspace_energy < 1.0:
            raise ValueError(f"nullspace_energy must be in [0, 1), got {self.nullspace_energy}")
        if self.nullspace_threshold is not None and self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold must be positive, got {self.nullspace_threshold}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")


def null_space_projector(c0: torch.Tensor, threshold: float | None = None, energy: float | None = None) -> torch.Tensor:
    """P = U_s U_sᵀ over the eigenvectors of the symmetric C0 with eigenvalues below ``threshold``, or (given
    ``energy`` instead) over its smallest eigen-directions whose eigenvalues sum to at most ``energy`` × trace."""
    if (threshold is None) == (energy is None):
        raise ValueError("give exactly one of threshold and energy")
    values, vectors = torch.linalg.eigh(c0.double())  # ascending
    if threshold is not None:
        kept = values < threshold
    else:
        kept = values.clamp(min=0).cumsum(0) <= energy * values.clamp(min=0).sum()
    return vectors[:, kept] @ vectors[:, kept].T


def alphaedit_update(keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor,
                     previous: torch.Tensor, l2: float) -> torch.Tensor:
    """ΔW (d_model, d_mlp) in float64 for ``keys`` (n, d_mlp) and ``residuals`` (n, d_model)."""
    k, r = keys.double().T, residuals.to(keys.device, torch.float64).T
    identity = torch.eye(len(projector), dtype=k.dtype, device=k.device)
    system = projector @ (k @ k.T + previous) + l2 * identity
    return torch.linalg.solve(system, projector @ k @ r.T).T


class AlphaEditor(WeightEditor):
    """Sequential AlphaEdit: each call is projected away from C0's span and from every earlier call's keys
    (kept per layer in ``previous_keys``); ``undo`` takes every call back, bit for bit."""

    def __init__(self, model, config: AlphaEditConfig) -> None:
        super().__init__("alphaedit", model, config, self._compute)
        self.projectors: dict[int, torch.Tensor] = {}
        self.null_space_ranks: dict[int, int] = {}  # layer -> dim of the space edits are written in
        self.previous_keys: dict[int, torch.Tensor] = {}  # layer -> Σ K Kᵀ of earlier calls (float64)

    def _compute(self, model, requests: Sequence[Fact], config: AlphaEditConfig) -> WeightEdit:
        used: dict[int, torch.Tensor] = {}

        def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
            if layer not in self.projectors:
                projector = null_space_projector(c0, config.nullspace_threshold, config.nullspace_energy)
                self.projectors[layer] = projector.to(keys.device)
                self.null_space_ranks[layer] = round(torch.trace(projector).item())
            projector = self.projectors[layer]
            previous = self.previous_keys.get(layer, torch.zeros_like(projector))
            used[layer] = keys.double().T @ keys.double()
            return alphaedit_update(keys, residuals, projector, previous.to(projector.device), config.l2)

        edit = apply_memit(model, requests, config, solver=solve, method="alphaedit")
        for layer, outer in used.items():  # only once the call succeeded
            self.previous_keys[layer] = self.previous_keys.get(layer, torch.zeros_like(outer)) + outer
        return edit

    def undo(self) -> None:
        super().undo()
        self.previous_keys = {}

    def save(self, path: str | Path) -> Path:
        """The calls' updates and C_prev (so a loaded editor keeps protecting them)."""
        state = {f"previous_keys.{layer}": outer for layer, outer in self.previous_keys.items()}
        return save_edit_sequence(path, self.edits, state)

    @classmethod
    def load(cls, path: str | Path, model, config: AlphaEditConfig = AlphaEditConfig()) -> "AlphaEditor":
        """An editor on ``model`` with the saved calls applied and their C_prev restored."""
        editor = cls(model, config)
        editor._apply_saved(load_edit_sequence(path), path)
        editor.previous_keys = {int(name.split(".")[1]): tensor.double()
                                for name, tensor in load_edit_state(path).items() if name.startswith("previous_keys.")}
        return editor
