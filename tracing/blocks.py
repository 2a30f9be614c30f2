"""Run a bridge's transformer blocks one by one on the *suffix* of a batch, over a cached prefix.

Tracing (restore a state, see what changes) and MEMIT's target optimisation (shift a state, train the
shift) both change one hidden state and need the model's output after it. Everything before that state
is fixed: earlier positions come from a key/value cache, earlier layers are skipped. What a block needs
besides its hidden states — attention mask, rotary tables, position ids — depends on the architecture,
so we never build it ourselves: :func:`capture_block_calls` records the arguments each block receives
in one real forward of the suffix over the cached prefix, and :func:`call_block` replays them with a
different batch of hidden states. Hooks on the blocks keep firing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class EngineUnsupported(RuntimeError):
    """The model cannot be driven block by block; callers fall back to plain forward passes."""


class PrefixKV:
    """Stands in for a Hugging Face cache inside one block call: prepends fixed prefix keys/values.

    Attention modules call ``cache.update(k, v, layer_idx)`` and attend over what it returns; the prefix
    is never mutated, so one prefix serves any number of calls.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, *args, **kwargs) -> int:
        return int(self.keys.shape[-2])


@dataclass
class BlockCalls:
    """The (args, kwargs) every block received in one forward, and any hidden states kept from it."""

    arguments: list[tuple[tuple, dict]]
    kept: dict[str, torch.Tensor]
    n_rows: int

    def select_rows(self, rows: torch.Tensor) -> "BlockCalls":
        """The same calls for a subset of the batch rows (per-row masks, positions and rotary tables).

        Tensors of two or more dimensions whose first dimension is the batch are indexed; broadcast
        (size-1) and 1-D tensors such as ``cache_position`` are shared as they are.
        """
        def pick(value):
            if isinstance(value, torch.Tensor):
                return value[rows] if value.ndim >= 2 and value.shape[0] == self.n_rows else value
            if isinstance(value, tuple):
                return tuple(pick(v) for v in value)
            if isinstance(value, list):
                return [pick(v) for v in value]
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return value

        arguments = [(pick(args), pick(kwargs)) for args, kwargs in self.arguments]
        return BlockCalls(arguments, {k: v[rows] for k, v in self.kept.items()}, len(rows))


def filled_cache(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, hooks=()):
    """Forward ``tokens`` (no grad) and return ``(logits, [(keys, values) per layer])`` of its KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks), past_key_values=cache,
                                      attention_mask=attention_mask)
    n_layers = len(model.blocks)
    layers = getattr(cache, "layers", [])
    if len(layers) < n_layers or any(getattr(layer, "keys", None) is None for layer in layers[:n_layers]):
        raise EngineUnsupported("the model did not fill a key/value cache for every layer")
    return logits, [(layer.keys, layer.values) for layer in layers[:n_layers]]


@torch.no_grad()
def capture_block_calls(model, suffix: torch.Tensor, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        attention_mask: torch.Tensor | None = None, keep: Sequence[str] = ()) -> BlockCalls:
    """Run ``suffix`` over the cached prefix once, recording each block's call arguments and the
    activations named in ``keep`` (for the suffix positions)."""
    from transformers import DynamicCache

    arguments: list[tuple[tuple, dict] | None] = [None] * len(model.blocks)
    kept: dict[str, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs, j=j: arguments.__setitem__(j, (args, dict(kwargs))), with_kwargs=True)
        for j, block in enumerate(model.blocks)
    ]

    def keep_state(state: torch.Tensor, hook) -> None:
        kept[hook.name] = state.detach()

    try:
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix_kv])
        model.run_with_hooks(suffix, fwd_hooks=[(name, keep_state) for name in keep],
                             past_key_values=cache, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if any(a is None for a in arguments):
        raise EngineUnsupported("not every block was called during the suffix forward")
    return BlockCalls(arguments, kept, int(suffix.shape[0]))  # type: ignore[arg-type]


def call_block(model, layer: int, hidden: torch.Tensor, arguments: tuple[tuple, dict],
               prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """Run block ``layer`` on ``hidden`` with recorded ``arguments``, attending over the given prefix."""
    from transformers.cache_utils import Cache

    prefix = PrefixKV(prefix_keys, prefix_values)
    args, kwargs = arguments

    def swap(value):
        return prefix if isinstance(value, (Cache, PrefixKV)) else value

    out = model.blocks[layer](hidden, *[swap(a) for a in args[1:]], **{k: swap(v) for k, v in kwargs.items()})
    return out[0] if isinstance(out, tuple) else out


def logits_of(model, final_hidden: torch.Tensor) -> torch.Tensor:
    """Logits for a (rows, d_model) batch of final-block outputs (final norm + unembedding)."""
    return model.unembed(model.ln_final(final_hidden[:, None, :]))[:, 0]
