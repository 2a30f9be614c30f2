"""Attribution patching (AtP): a linear estimate of every restored cell from two forwards and one backward.

For a cell (kind, token t, layer l) exact tracing runs the corrupted prompt with the clean state copied in.
AtP replaces that run by the first-order term of its Taylor expansion around the corrupted run
(Nanda 2023; Kramar et al. 2024, "AtP*"):

    IE(t, l) ~ (a_clean[t, l] - a_corrupt[t, l]) . d metric / d a[t, l]   (gradient on the corrupted run)

averaged over the corrupted rows (noise samples or replacement subjects). One clean forward, one
corrupted forward and one backward give every (token, layer, kind) at once.

For ``mlp``/``attn`` exact tracing restores a *window* of layers; AtP's estimate for a window is defined
as the **sum of the per-layer terms over the window**. Each per-layer gradient still runs through the
later layers of the same window, which a real restoration holds fixed, so the sum counts those paths once
more than the first-order expansion of the window restoration would: read it as a ranking, not as a
probability. AtP is known to be weak where the effect is non-linear (the residual stream, probabilities
near 0 or 1): :func:`tracing.atp_accuracy.atp_accuracy` measures how weak.

In the ``noising`` direction the roles swap: the base run is clean, the gradient is taken there, and the
term is ``(a_corrupt - a_clean) . d metric / d a`` (the estimated change when one state is corrupted).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from tracing.adapter import ModelAdapter
from tracing.engine import EngineOutput, TraceInputs, _add_noise_hook, _answer_probs, restored_layers

DIRECTIONS = ("denoising", "noising")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


def _run(model, inputs: TraceInputs, names: list[str], corrupted: bool, grad: bool):
    """One forward of the clean prompt (1 row) or the corrupted one (one row per sample): the per-row
    metric and the activations at ``names``; with ``grad`` they stay in the graph for a backward."""
    adapter = ModelAdapter.of(model)
    rows = inputs.samples if corrupted else 1
    states: dict[str, torch.Tensor] = {}
    add_noise = _add_noise_hook(inputs.noise, inputs.subject, first_row=0)

    def start(embeddings: torch.Tensor, hook) -> torch.Tensor:
        embeddings = add_noise(embeddings, hook) if corrupted else embeddings
        return embeddings.detach().requires_grad_(True) if grad else embeddings

    def keep(state: torch.Tensor, hook) -> None:
        states[hook.name] = state if grad else state.detach()

    hooks = [(adapter.embed, start)] + [(name, keep) for name in names]
    with torch.set_grad_enabled(grad):
        logits = model.run_with_hooks(inputs.tokens.repeat(rows, 1), fwd_hooks=hooks)
    return _answer_probs(logits[:, -1], inputs), int(logits[0, -1].argmax()), states


def attribution_patching(model, inputs: TraceInputs, kinds: Iterable[str], window: int,
                         direction: str = "denoising") -> EngineOutput:
    """AtP estimates of every cell, in the shape of an exact engine's output: ``scores`` holds the base
    run's metric plus the estimated effect (corrupted + IE when denoising, clean + change when noising)."""
    check_direction(direction)
    kinds = list(kinds)
    adapter = ModelAdapter.of(model)
    n_layers = adapter.n_layers
    names = sorted({adapter.state_hook(kind, layer) for kind in kinds for layer in range(n_layers)})
    denoising = direction == "denoising"
    clean_metric, clean_top, clean = _run(model, inputs, names, corrupted=False, grad=not denoising)
    corrupt_metric, _, corrupt = _run(model, inputs, names, corrupted=True, grad=denoising)
    base_metric, base, source = (corrupt_metric, corrupt, clean) if denoising else (clean_metric, clean, corrupt)
    gradients = torch.autograd.grad(base_metric.sum(), [base[name] for name in names], allow_unused=True)
    terms: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, gradient in zip(names, gradients):
            if gradient is None:  # the state does not reach the metric
                terms[name] = np.zeros(inputs.n_tokens)
                continue
            difference = source[name].float() - base[name].detach().float()  # (rows, T, d), broadcast 1 <-> N
            terms[name] = (difference * gradient.float()).sum(-1).mean(0).cpu().double().numpy()
    start = float(base_metric.detach().mean())
    scores = {}
    for kind in kinds:
        per_layer = np.stack([terms[adapter.state_hook(kind, layer)] for layer in range(n_layers)], axis=1)
        summed = np.stack([per_layer[:, list(restored_layers(kind, layer, n_layers, window))].sum(axis=1)
                           for layer in range(n_layers)], axis=1)
        scores[kind] = start + summed
    return EngineOutput(float(clean_metric[0].detach()), float(corrupt_metric.detach().mean()), clean_top, scores)
