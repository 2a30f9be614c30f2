"""ROME (Meng et al., NeurIPS 2022) as MEMIT's one-layer case: one MLP down-projection, the update in its
soft (λ-regularised) form. The layer defaults to the last of the critical band, where the last-subject-token
effect peaks (the band ends at the peak: GPT-2 XL's 13-17 -> 17, ROME's own GPT-2 XL layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from editing.memit import MemitConfig, apply_memit
from editing.weights import WeightEdit
from tracing.facts import Fact
from tracing.layer_set import LayerSet


@dataclass(frozen=True)
class RomeConfig(MemitConfig):
    """MEMIT's settings on one layer; ``layers`` may name it (one layer), or None for the critical peak."""

    def resolved_layer_set(self, model) -> LayerSet:
        chosen = super().resolved_layer_set(model)
        if len(chosen.layers) == 1:
            return chosen
        if self.layers is not None:
            raise ValueError(f"ROME edits one layer, got {chosen.layers}: use MEMIT for several")
        detail = f"last layer of {list(chosen.layers)} ({chosen.detail})" if chosen.detail else ""
        return LayerSet((chosen.layers[-1],), chosen.source, detail)


def apply_rome(model, requests: Sequence[Fact], config: RomeConfig = RomeConfig()) -> WeightEdit:
    """Edit ``model`` in place at one layer; returns the applied, undoable :class:`WeightEdit`."""
    return apply_memit(model, requests, config, method="rome")
