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

``steps`` > 1 (denoising only) averages the gradient over that many corrupted runs whose noise is scaled
down from 1 towards 0 (1, 1 - 1/k, ..., 1/k): a left Riemann sum of the path integral from the corrupted
to the clean input (integrated gradients on the inputs, as EAP-IG; Hanna et al. 2024). The difference
a_clean - a_corrupt stays that of the full corruption; ``steps=1`` is AtP itself. Each step costs one
more forward and backward and follows the effect where it is non-linear.

In the ``noising`` direction the roles swap: the base run is clean, the gradient is taken there, and the
term is ``(a_corrupt - a_clean) . d metric / d a`` (the estimated change when one state is corrupted).

``space`` is where the estimate is linear. ``log_odds`` (the default) linearises log(p / (1 - p)) of the
answer, computed from the logits, and reads each corrupted row's estimate back as a probability,
``sigmoid(log_odds_row + sum of the row's terms)``, before averaging over rows: a restoration that takes
p from 0.01 to 0.8 is a change of 6 in log-odds, which a first-order term follows far better than the
change of 0.79 in p it makes, where the softmax saturates. Under ``metric="logit_diff"`` the metric is
already a difference of logits and is linearised as it is. ``space="metric"`` linearises the metric itself
(plain AtP). Measured on 50 facts of the embedded model (docs/atp.md): per-fact Pearson r with exact
tracing 0.583 -> 0.642 for mlp and 0.845 -> 0.926 for attn, at the same cost.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from tracing.adapter import ModelAdapter
from tracing.engine import EngineOutput, TraceInputs, _add_noise_hook, _answer_probs, restored_layers

DIRECTIONS = ("denoising", "noising")
SPACES = ("log_odds", "metric")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


def check_steps(steps: int, direction: str) -> None:
    if steps < 1:
        raise ValueError(f"atp steps must be >= 1, got {steps}")
    if steps > 1 and direction != "denoising":
        raise ValueError("atp steps > 1 (integrated gradients) are defined for the denoising direction only")


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"unknown atp space {space!r}; expected one of {SPACES}")


def _log_odds(logits_last: torch.Tensor, answer_id: int) -> torch.Tensor:
    """Per row: log(p / (1 - p)) of the answer, as logit(answer) - logsumexp(every other logit) (exact and
    finite where p rounds to 0 or 1 in float32)."""
    logits = logits_last.float()
    others = logits.clone()
    others[:, answer_id] = float("-inf")
    return logits[:, answer_id] - torch.logsumexp(others, dim=-1)


def _reads_back(space: str, inputs: TraceInputs) -> bool:
    """Whether the estimate is made in log-odds and read back as a probability: ``log_odds`` on the
    probability metric (a logit difference is already linear in the logits and is used as it is)."""
    return space == "log_odds" and inputs.counterfactual_id is None


def _run(model, batch: Sequence[TraceInputs], names: list[str], corrupted: bool, grad: bool, scale: float = 1.0,
         space: str = "metric"):
    """One forward of the clean prompts (one row per fact) or the corrupted ones (one row per sample of
    each fact), right-padded into one batch: per row the metric at its fact's last token and the quantity
    linearised in ``space`` (the metric again, or its log-odds), per fact the top-1 clean token, and the
    activations at ``names`` (rows, longest prompt, d); with ``grad`` they stay in the graph for a backward.
    ``scale`` multiplies the corruption's noise. Right padding changes nothing: a causal model's positions
    never see the padding after them."""
    adapter = ModelAdapter.of(model)
    counts = [inputs.samples if corrupted else 1 for inputs in batch]
    firsts = np.cumsum([0] + counts[:-1]).tolist()
    width = max(inputs.n_tokens for inputs in batch)
    device = batch[0].tokens.device
    tokens = torch.zeros(sum(counts), width, dtype=torch.long, device=device)
    for inputs, first, count in zip(batch, firsts, counts):
        tokens[first: first + count, : inputs.n_tokens] = inputs.tokens
    states: dict[str, torch.Tensor] = {}
    noises = [_add_noise_hook(inputs.noise * scale, inputs.subject, first) for inputs, first in zip(batch, firsts)]

    def start(embeddings: torch.Tensor, hook) -> torch.Tensor:
        if corrupted:
            for add_noise in noises:
                embeddings = add_noise(embeddings, hook)
        return embeddings.detach().requires_grad_(True) if grad else embeddings

    def keep(state: torch.Tensor, hook) -> None:
        states[hook.name] = state if grad else state.detach()

    hooks = [(adapter.embed, start)] + [(name, keep) for name in names]
    with torch.set_grad_enabled(grad):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        metrics, linear, tops = [], [], []
        for inputs, first, count in zip(batch, firsts, counts):
            last = logits[first: first + count, inputs.n_tokens - 1]
            metrics.append(_answer_probs(last, inputs))
            linear.append(_log_odds(last, inputs.answer_id) if _reads_back(space, inputs) else metrics[-1])
            tops.append(int(last[0].argmax()))
    return metrics, linear, tops, states, firsts


def attribution_patching(model, inputs: TraceInputs, kinds: Iterable[str], window: int,
                         direction: str = "denoising", steps: int = 1, space: str = "log_odds") -> EngineOutput:
    """AtP estimates of every cell, in the shape of an exact engine's output: ``scores`` holds the
    estimated metric after the restoration (denoising) or the corruption (noising) of each cell, averaged
    over the corrupted rows, as an exact engine's scores are."""
    return attribution_patching_batch(model, [inputs], kinds, window, direction, steps, space)[0]


def attribution_patching_batch(model, batch: Sequence[TraceInputs], kinds: Iterable[str], window: int,
                               direction: str = "denoising", steps: int = 1,
                               space: str = "log_odds") -> list[EngineOutput]:
    """:func:`attribution_patching` of many facts at once: their clean prompts in one forward, their
    corrupted rows in another, one backward. Each fact's numbers are the ones it gets alone (to float
    rounding: a test holds them to 1e-5); only the batch is larger."""
    check_direction(direction)
    check_steps(steps, direction)
    check_space(space)
    kinds = list(kinds)
    adapter = ModelAdapter.of(model)
    n_layers = adapter.n_layers
    names = sorted({adapter.state_hook(kind, layer) for kind in kinds for layer in range(n_layers)})
    denoising = direction == "denoising"
    clean_metric, clean_linear, clean_top, clean, clean_firsts = _run(model, batch, names, corrupted=False,
                                                                      grad=not denoising, space=space)
    corrupt_metric, corrupt_linear, _, corrupt, corrupt_firsts = _run(model, batch, names, corrupted=True,
                                                                      grad=denoising, space=space)
    base_metric, base_linear = (corrupt_metric, corrupt_linear) if denoising else (clean_metric, clean_linear)
    base, source = (corrupt, clean) if denoising else (clean, corrupt)
    base_firsts, source_firsts = (corrupt_firsts, clean_firsts) if denoising else (clean_firsts, corrupt_firsts)
    total = sum(linear.sum() for linear in base_linear)  # each row's value reads its own row only
    gradients = torch.autograd.grad(total, [base[name] for name in names], allow_unused=True)
    for step in range(1, steps):  # integrated gradients: the corruption scaled down towards the clean input
        _, linear, _, states, _ = _run(model, batch, names, corrupted=True, grad=True, scale=1.0 - step / steps,
                                       space=space)
        more = torch.autograd.grad(sum(v.sum() for v in linear), [states[name] for name in names], allow_unused=True)
        gradients = [g if m is None else (m if g is None else g + m) for g, m in zip(gradients, more)]
    if steps > 1:
        gradients = [None if g is None else g / steps for g in gradients]
    outputs = []
    with torch.no_grad():
        for f, inputs in enumerate(batch):
            n_base, n_source = len(base_linear[f]), (1 if denoising else inputs.samples)
            n_rows = max(n_base, n_source)
            rows = slice(base_firsts[f], base_firsts[f] + n_base)
            source_rows = slice(source_firsts[f], source_firsts[f] + n_source)
            terms: dict[str, np.ndarray] = {}  # per row: (rows, T)
            for name, gradient in zip(names, gradients):
                if gradient is None:  # the state does not reach the metric
                    terms[name] = np.zeros((n_rows, inputs.n_tokens))
                    continue
                tokens = slice(0, inputs.n_tokens)
                # (rows, T, d), broadcast 1 <-> N
                difference = source[name][source_rows, tokens].float() - base[name][rows, tokens].detach().float()
                terms[name] = (difference * gradient[rows, tokens].float()).sum(-1).cpu().double().numpy()
            start = float(base_metric[f].detach().mean())
            linear = base_linear[f].detach().cpu().double().numpy()[:, None, None]  # (rows or 1, 1, 1)
            read_back = _reads_back(space, inputs)  # linear in log-odds: read back as a probability
            scores = {}
            for kind in kinds:
                per_layer = np.stack([terms[adapter.state_hook(kind, layer)] for layer in range(n_layers)], axis=2)
                summed = np.stack([per_layer[:, :, list(restored_layers(kind, layer, n_layers, window))].sum(axis=2)
                                   for layer in range(n_layers)], axis=2)  # (rows, T, L)
                # the change per row (exactly 0 where no state differs, as before the subject), averaged
                change = _sigmoid(linear + summed) - _sigmoid(linear) if read_back else summed
                scores[kind] = start + change.mean(axis=0)
            outputs.append(EngineOutput(float(clean_metric[f][0].detach()), float(corrupt_metric[f].detach().mean()),
                                        clean_top[f], scores))
    return outputs


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # finite for any x, unlike 1 / (1 + exp(-x))
