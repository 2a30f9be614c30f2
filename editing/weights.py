"""A weight edit as an object: inspect it, apply it, undo it exactly, save it, load it elsewhere.

MEMIT's result is an additive update ``ΔW`` to the MLP down-projection of a few layers. We keep the
updates in one orientation, (d_model, d_mlp), whatever the module stores. Applying remembers the exact
original tensors, so ``undo`` restores them bit for bit (``W + ΔW - ΔW`` would not). Edits stack: the
model keeps a stack of applied edits and only the most recent one can be undone, so an undo never erases
a later edit's changes. Saved files are safetensors, written atomically, with a fingerprint of the weights
the edit was computed on, so loading it onto a different model is refused instead of silently wrong.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tracing.adapter import ModelAdapter
from tracing.facts import Fact
from tracing.io import load_tensors, save_tensors_atomic
from tracing.models import model_spec
from tracing.state import state_of


class EditStateError(RuntimeError):
    """Applying or undoing an edit in the wrong state (twice, out of order, or on the wrong model)."""


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of a weight's bytes (float32 view), short enough to store in file metadata."""
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def _edit_stack(model) -> list:
    return state_of(model).edit_stack


@dataclass
class WeightEdit:
    """Additive updates ``deltas[layer]`` (d_model x d_mlp) to MLP down-projections."""

    method: str
    model_name: str
    deltas: dict[int, torch.Tensor]
    requests: list[Fact] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    base_fingerprints: dict[int, str] = field(default_factory=dict)
    _originals: dict[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.deltas))

    @property
    def applied(self) -> bool:
        return self._originals is not None

    def norms(self) -> dict[int, float]:
        """Frobenius norm of each layer's update (how hard each layer was pushed)."""
        return {layer: float(delta.norm()) for layer, delta in sorted(self.deltas.items())}

    # --- apply / undo ---------------------------------------------------------------------------------
    def apply(self, model) -> "WeightEdit":
        if self.applied:
            raise EditStateError("this edit is already applied")
        adapter = ModelAdapter.of(model)
        for layer, delta in self.deltas.items():
            weight = adapter.down_projection(model, layer)
            expected = (adapter.d_model, adapter.d_mlp)
            if tuple(delta.shape) != expected:
                raise EditStateError(f"layer {layer}: update shape {tuple(delta.shape)} does not fit {expected}")
            fingerprint = self.base_fingerprints.get(layer)
            if fingerprint is not None and fingerprint != weight_fingerprint(weight):
                raise EditStateError(
                    f"layer {layer}: the model's weights are not the ones this edit was computed on "
                    f"(edit made for {self.model_name!r}, possibly after other edits)"
                )
        originals = {}
        with torch.no_grad():
            for layer, delta in self.deltas.items():
                weight = adapter.down_projection(model, layer)
                originals[layer] = weight.detach().clone()
                stored = adapter.to_stored_orientation(model, layer, delta)
                weight.add_(stored.to(device=weight.device, dtype=weight.dtype))
        self._originals = originals
        _edit_stack(model).append(self)
        return self

    def undo(self, model) -> None:
        if not self.applied:
            raise EditStateError("this edit is not applied")
        stack = _edit_stack(model)
        if not stack or stack[-1] is not self:
            raise EditStateError("undo later edits first: only the most recently applied edit can be undone")
        adapter = ModelAdapter.of(model)
        with torch.no_grad():
            for layer, original in self._originals.items():
                adapter.down_projection(model, layer).copy_(original)
        stack.pop()
        self._originals = None

    # --- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {f"delta.{layer}": delta.detach().to("cpu", torch.float32).contiguous()
                   for layer, delta in self.deltas.items()}
        return save_tensors_atomic(path, tensors, "factlens", self._meta())

    @classmethod
    def load(cls, path: str | Path) -> "WeightEdit":
        tensors, meta = load_tensors(path, "factlens")
        return cls._from(meta, {int(key.split(".")[1]): tensor for key, tensor in tensors.items()})

    def _meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model_name": self.model_name,
            "config": self.config,
            "base_fingerprints": {str(k): v for k, v in self.base_fingerprints.items()},
            "requests": [fact.to_counterfact() for fact in self.requests],
        }

    @classmethod
    def _from(cls, meta: dict[str, Any], deltas: dict[int, torch.Tensor]) -> "WeightEdit":
        return cls(
            method=meta["method"],
            model_name=meta["model_name"],
            deltas=deltas,
            requests=[Fact.from_counterfact(r) for r in meta["requests"]],
            config=meta["config"],
            base_fingerprints={int(k): v for k, v in meta["base_fingerprints"].items()},
        )


def save_edit_sequence(path: str | Path, edits: list[WeightEdit], state: dict[str, torch.Tensor] | None = None) -> Path:
    """Several edits applied one after the other, in one file (each keeps its own fingerprints, taken on
    the weights its predecessors left), atomically; ``state``: an editor's own tensors, saved beside them
    (:func:`load_edit_state` reads them back)."""
    tensors = {f"edit.{i}.delta.{layer}": delta.detach().to("cpu", torch.float32).contiguous()
               for i, edit in enumerate(edits) for layer, delta in edit.deltas.items()}
    tensors |= {f"state.{name}": tensor.detach().cpu().contiguous() for name, tensor in (state or {}).items()}
    return save_tensors_atomic(path, tensors, "factlens", {"sequence": [edit._meta() for edit in edits]})


def load_edit_sequence(path: str | Path) -> list[WeightEdit]:
    """The edits of :func:`save_edit_sequence` (a file of one :meth:`WeightEdit.save` reads as one edit)."""
    tensors, meta = load_tensors(path, "factlens")
    if "sequence" not in meta:
        return [WeightEdit.load(path)]
    deltas: list[dict[int, torch.Tensor]] = [{} for _ in meta["sequence"]]
    for key, tensor in tensors.items():
        if not key.startswith("edit."):
            continue
        _, index, _, layer = key.split(".")
        deltas[int(index)][int(layer)] = tensor
    return [WeightEdit._from(record, layers) for record, layers in zip(meta["sequence"], deltas)]


def fingerprints(model, layers) -> dict[int, str]:
    adapter = ModelAdapter.of(model)
    return {layer: weight_fingerprint(adapter.down_projection(model, layer)) for layer in layers}


def edit_for(model, method: str, deltas: dict[int, torch.Tensor], requests: list[Fact],
             config: dict[str, Any]) -> WeightEdit:
    """A :class:`WeightEdit` for ``model`` as it is now (fingerprints taken from its current weights)."""
    return WeightEdit(method=method, model_name=model_spec(model).name, deltas=deltas, requests=requests,
                      config=config, base_fingerprints=fingerprints(model, deltas))


def load_edit_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state`` tensors :func:`save_edit_sequence` stored beside the edits."""
    tensors, _ = load_tensors(path, "factlens")
    return {key[len("state."):]: tensor for key, tensor in tensors.items() if key.startswith("state.")}
