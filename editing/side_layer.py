"""Which layer a side memory or codebook sits at by default (WISE and GRACE share the choice)."""

from __future__ import annotations

LAYER_FRACTION = 0.84  # LLaMA-2-7B: layer 27 of 32 in the paper and EasyEdit


def default_layer(n_layers: int) -> int:
    """The side-memory layer by default: ``round(0.84 * n_layers)``, the paper's LLaMA choice (27 of 32;
    25 of 30 for SmolLM2). The paper's layer ablation favours mid-to-late layers."""
    return min(n_layers - 1, round(LAYER_FRACTION * n_layers))
