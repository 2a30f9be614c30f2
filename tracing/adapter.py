"""One small adapter over architecture differences.

TransformerBridge already gives every architecture the same hook names (``blocks.{l}.hook_out``,
``blocks.{l}.mlp.hook_out``, ...). What still differs is the orientation of the MLP down-projection
weight: ``nn.Linear`` stores it as (d_model, d_mlp), GPT-2's ``Conv1D`` as (d_mlp, d_model). Editing code
asks this adapter for the weight in one orientation, (d_model, d_mlp) = "out x in", and never branches on
the architecture itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("resid", "mlp", "attn")


@dataclass(frozen=True)
class ModelAdapter:
    """Hook names and weight access for one loaded ``TransformerBridge``."""

    n_layers: int
    d_model: int
    d_mlp: int

    @classmethod
    def of(cls, model) -> "ModelAdapter":
        cfg = model.cfg
        return cls(n_layers=int(cfg.n_layers), d_model=int(cfg.d_model), d_mlp=int(cfg.d_mlp))

    # --- hook names -------------------------------------------------------------------------------
    embed = "embed.hook_out"  # token embeddings (before positional embeddings on GPT-2): where noise goes
    token_ids = "embed.hook_in"  # the input token ids of a forward (editors that match text read them)

    @staticmethod
    def resid_in(layer: int) -> str:
        return f"blocks.{layer}.hook_in"

    @staticmethod
    def resid_out(layer: int) -> str:
        return f"blocks.{layer}.hook_out"

    @staticmethod
    def mlp_out(layer: int) -> str:
        return f"blocks.{layer}.mlp.hook_out"

    @staticmethod
    def attn_out(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_out"

    @staticmethod
    def mlp_key(layer: int) -> str:
        """Input of the MLP down-projection: the key k in MEMIT's W k = v."""
        return f"blocks.{layer}.mlp.out.hook_in"

    @staticmethod
    def mlp_value(layer: int) -> str:
        """Output of the MLP down-projection (bias included): the value v in MEMIT's W k = v."""
        return f"blocks.{layer}.mlp.out.hook_out"

    def state_hook(self, kind: str, layer: int) -> str:
        """The hook whose output tracing restores for ``kind`` at ``layer``."""
        if kind == "resid":
            return self.resid_out(layer)
        if kind == "mlp":
            return self.mlp_out(layer)
        if kind == "attn":
            return self.attn_out(layer)
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    # --- weights ------------------------------------------------------------------------------------
    @staticmethod
    def down_projection(model, layer: int) -> torch.nn.Parameter:
        """The down-projection weight parameter of ``layer``, in the module's own orientation."""
        return model.blocks[layer].mlp.out.original_component.weight

    def down_projection_is_transposed(self, model, layer: int) -> bool:
        """True when the stored weight is (d_mlp, d_model) (GPT-2's Conv1D) rather than (d_model, d_mlp)."""
        weight = self.down_projection(model, layer)
        if self.d_model == self.d_mlp:
            return type(model.blocks[layer].mlp.out.original_component).__name__ == "Conv1D"
        return tuple(weight.shape) == (self.d_mlp, self.d_model)

    def read_down_projection(self, model, layer: int) -> torch.Tensor:
        """A copy of the down-projection as (d_model, d_mlp)."""
        weight = self.down_projection(model, layer).detach()
        return (weight.T if self.down_projection_is_transposed(model, layer) else weight).clone()

    def to_stored_orientation(self, model, layer: int, out_in: torch.Tensor) -> torch.Tensor:
        """Turn a (d_model, d_mlp) tensor into the orientation the module stores."""
        return out_in.T if self.down_projection_is_transposed(model, layer) else out_in
