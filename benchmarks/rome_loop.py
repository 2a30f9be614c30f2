"""A faithful per-cell loop of kmeng01/rome's causal tracing, on a plain Hugging Face model (no bridge).

What rome's ``experiments/causal_trace.py`` does (``trace_with_patch``, ``trace_important_states``,
``trace_important_window``), rewritten with plain torch forward hooks: for every (kind, token, layer) cell one
forward pass of [1 clean row + N corrupted rows]; a hook on the token embeddings adds the noise to the
subject tokens of rows 1..N, and hooks on the restored modules (the decoder layer for the residual stream, its
MLP or attention over a window of 10 layers) copy the clean row's state at that token into the corrupted
rows. The score is the answer's probability at the last position, averaged over the corrupted rows. Every
token of the prompt is traced, as rome does. The noise is passed in, so the loop can be compared number for
number with our engines given the same noise tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from tracing.engine import restored_layers

ATTENTION_NAMES = ("self_attn", "attn", "attention")


@dataclass(frozen=True)
class RomeTrace:
    """The loop's heatmaps (``scores[kind][token, layer]``), its answer and baselines, and how many forward
    passes of how many rows it ran (for counting its floating-point work)."""

    scores: dict[str, np.ndarray]
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    forwards: int  # batched forward passes of ``rows`` rows (the clean prediction is one more, of 1 row)
    rows: int


def decoder_layers(hf_model) -> nn.ModuleList:
    """The decoder layers of a Llama-, GPT-2-, GPT-J- or NeoX-style Hugging Face causal LM."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        module = hf_model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(hf_model).__name__}")


def state_module(hf_model, kind: str, layer: int) -> nn.Module:
    """rome's ``layername``: the decoder layer (residual stream), its MLP or its attention module."""
    block = decoder_layers(hf_model)[layer]
    if kind == "resid":
        return block
    if kind == "mlp":
        return block.mlp
    for name in ATTENTION_NAMES:
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"cannot find the attention module of {type(block).__name__}")


def _untuple(output):
    return output[0] if isinstance(output, tuple) else output


def _noise_hook(noise: torch.Tensor, subject: tuple[int, int]) -> Callable:
    start, end = subject

    def hook(module, args, output):
        output[1:, start:end] += noise.to(output.dtype)
        return output

    return hook


def _restore_hook(token: int) -> Callable:
    def hook(module, args, output):
        state = _untuple(output)
        state[1:, token] = state[0, token]
        return output

    return hook


@torch.no_grad()
def _patched_answer_prob(hf_model, batch: torch.Tensor, noise: torch.Tensor, subject: tuple[int, int],
                         restore: Sequence[tuple[nn.Module, int]], answer_id: int) -> float:
    """rome's ``trace_with_patch``: one forward of the batch with noise and restorations, mean p(answer)."""
    handles = [hf_model.get_input_embeddings().register_forward_hook(_noise_hook(noise, subject))]
    handles += [module.register_forward_hook(_restore_hook(token)) for module, token in restore]
    try:
        logits = hf_model(input_ids=batch, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.softmax(logits[1:, -1].float(), dim=-1).mean(dim=0)[answer_id])


@torch.no_grad()
def rome_trace(hf_model, token_ids: Sequence[int], subject: tuple[int, int], noise: torch.Tensor,
               kinds: Sequence[str], window: int = 10) -> RomeTrace:
    """Every cell of every kind, one forward per cell, as rome's ``calculate_hidden_flow`` (answer = the
    clean model's top-1 token; ``noise``: (N, subject tokens, d_model))."""
    device = hf_model.get_input_embeddings().weight.device
    tokens = torch.tensor([list(token_ids)], device=device)
    noise = noise.to(device)
    clean_logits = hf_model(input_ids=tokens, use_cache=False).logits[0, -1].float()
    answer_id = int(clean_logits.argmax())
    clean_prob = float(torch.softmax(clean_logits, dim=-1)[answer_id])
    batch = tokens.repeat(noise.shape[0] + 1, 1)
    corrupted = _patched_answer_prob(hf_model, batch, noise, subject, [], answer_id)
    n_layers, n_tokens = len(decoder_layers(hf_model)), tokens.shape[1]
    scores = {kind: np.zeros((n_tokens, n_layers)) for kind in kinds}
    forwards = 1
    for kind in kinds:
        for token in range(n_tokens):
            for layer in range(n_layers):
                restore = [(state_module(hf_model, kind, j), token)
                           for j in restored_layers(kind, layer, n_layers, window)]
                scores[kind][token, layer] = _patched_answer_prob(hf_model, batch, noise, subject, restore,
                                                                  answer_id)
                forwards += 1
    return RomeTrace(scores, answer_id, clean_prob, corrupted, forwards, int(batch.shape[0]))
