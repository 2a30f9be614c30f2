"""Record the calls into a bridge's transformer blocks once, then rerun only the later blocks.

Tracing (restore a state, see what changes), MEMIT's target optimisation (shift a state, train the shift)
and the hook editors' training (WISE's side memory, GRACE's values: change one layer's MLP output) all
change one hidden state and need the model's output after it. Everything before that state is fixed:
earlier layers are skipped and, for tracing and MEMIT, earlier positions come from a key/value cache.
What a block needs besides its hidden states — attention mask, rotary tables, position ids — depends on
the architecture, so we never build it ourselves: :func:`capture_block_calls` records the arguments each
block receives in one real forward, and :func:`call_block` / :func:`replay_later_blocks` replay them
with a different batch of hidden states. Hooks on the blocks keep firing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from tracing.adapter import ModelAdapter


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
    """The (args, kwargs) each recorded block received in one forward (None for a block not recorded),
    and any hidden states kept from it."""

    arguments: list[tuple[tuple, dict] | None]
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
def capture_block_calls(model, tokens: torch.Tensor,
                        prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        attention_mask: torch.Tensor | None = None, keep: Sequence[str] = (),
                        blocks: Sequence[int] | None = None) -> BlockCalls:
    """Run ``tokens`` once, recording the call arguments of ``blocks`` (None: every block) and the
    activations named in ``keep``; the forward stops after the last block (no final norm, no unembedding).

    With ``prefix_kv`` the tokens are a suffix over that cached prefix (the calls then hold a cache, which
    :func:`call_block` swaps for the prefix it is given); without it the forward uses no cache at all, so
    replayed calls never append to one."""
    from transformers import DynamicCache

    n_layers = len(model.blocks)
    recorded = range(n_layers) if blocks is None else blocks
    arguments: list[tuple[tuple, dict] | None] = [None] * n_layers
    kept: dict[str, torch.Tensor] = {}
    handles = [
        model.blocks[j].register_forward_pre_hook(
            lambda module, args, kwargs, j=j: arguments.__setitem__(j, (args, dict(kwargs))), with_kwargs=True)
        for j in recorded
    ]

    def keep_state(state: torch.Tensor, hook) -> None:
        kept[hook.name] = state.detach()

    def stop(state: torch.Tensor, hook) -> None:
        raise StopAtLayerException(state)  # every block has run: what follows is not needed

    hooks = [(name, keep_state) for name in keep] + [(ModelAdapter.resid_out(n_layers - 1), stop)]
    if prefix_kv is None:
        run = dict(use_cache=False)
    else:
        run = dict(past_key_values=DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix_kv]))
    try:
        model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=attention_mask, **run)
    finally:
        for handle in handles:
            handle.remove()
    if any(arguments[j] is None for j in recorded):
        raise EngineUnsupported("not every block was called during the forward")
    return BlockCalls(arguments, kept, int(tokens.shape[0]))


def call_block(model, layer: int, hidden: torch.Tensor, arguments: tuple[tuple, dict],
               prefix_keys: torch.Tensor | None = None, prefix_values: torch.Tensor | None = None) -> torch.Tensor:
    """Run block ``layer`` on ``hidden`` with recorded ``arguments``, attending over the given prefix
    (None: the calls were recorded without a cache, and run as they were)."""
    from transformers.cache_utils import Cache

    args, kwargs = arguments
    if prefix_keys is None:
        out = model.blocks[layer](hidden, *args[1:], **kwargs)
    else:
        prefix = PrefixKV(prefix_keys, prefix_values)

        def swap(value):
            return prefix if isinstance(value, (Cache, PrefixKV)) else value

        out = model.blocks[layer](hidden, *[swap(a) for a in args[1:]], **{k: swap(v) for k, v in kwargs.items()})
    return out[0] if isinstance(out, tuple) else out


def replay_later_blocks(model, layer: int, calls: BlockCalls, hidden: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the final norm, from ``hidden`` after ``layer``: the later blocks
    replayed with calls recorded without a cache (apply :func:`logits_of` for logits)."""
    for block in range(layer + 1, len(model.blocks)):
        hidden = call_block(model, block, hidden, calls.arguments[block])
    return hidden


@dataclass
class RecordedRows:
    """What an optimisation of one layer's MLP output needs from a single forward of its rows."""

    keys: torch.Tensor  # (R, S, d_mlp) down-projection inputs, float32
    outputs: torch.Tensor  # (R, S, d_model) down-projection outputs
    hidden: torch.Tensor  # (R, S, d_model) residual stream after the layer, in the model's dtype
    calls: BlockCalls  # recorded arguments of the blocks after the layer


def record_rows(model, tokens: torch.Tensor, layer: int) -> RecordedRows:
    """One forward of right-padded ``tokens`` recording, at ``layer``, the down-projection's input and
    output and the residual stream after it, plus the arguments every later block received, so that an
    optimisation of that layer's output reruns only the later blocks (:func:`replay_later_blocks`)."""
    adapter = ModelAdapter.of(model)
    names = adapter.mlp_key(layer), adapter.mlp_value(layer), adapter.resid_out(layer)
    calls = capture_block_calls(model, tokens, keep=names, blocks=range(layer + 1, adapter.n_layers))
    keys, outputs, hidden = (calls.kept[name] for name in names)
    return RecordedRows(keys.float(), outputs, hidden, calls)


def logits_of(model, final_hidden: torch.Tensor) -> torch.Tensor:
    """Logits for a (rows, d_model) batch of final-block outputs (final norm + unembedding), on the
    device of ``final_hidden`` (under a device map the unembedding may live on another GPU)."""
    return model.unembed(model.ln_final(final_hidden[:, None, :]))[:, 0].to(final_hidden.device)
