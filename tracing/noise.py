"""The corruption in causal tracing: Gaussian noise on the subject's token embeddings.

ROME sets the noise standard deviation to 3x the (scalar) standard deviation of the token embeddings of
many subjects, and draws one fixed noise tensor (per fact) that every restored cell of a heatmap shares,
so cells differ only in what was restored.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tracing.placement import input_device
from tracing.state import state_of
from tracing.tokens import encode

DEFAULT_NOISE_MULTIPLIER = 3.0


@torch.no_grad()
def subject_embedding_std(model, subjects: Sequence[str]) -> float:
    """Scalar std of all token-embedding values of ``subjects`` (each tokenised on its own, as ROME).

    Embeddings are read through the bridge's ``embed`` component, i.e. the same activation that the
    noise is later added to (token embeddings, before positional embeddings).
    """
    if not subjects:
        raise ValueError("need at least one subject to measure the embedding scale")
    device = input_device(model)
    ids = [i for subject in subjects for i in encode(model, subject) if i != model.tokenizer.bos_token_id]
    embeddings = model.embed(torch.tensor([ids], device=device))
    return float(embeddings.float().std())


def default_noise_std(model, multiplier: float = DEFAULT_NOISE_MULTIPLIER) -> float:
    """``multiplier`` x the subject-embedding std, measured on the bundled known facts' subjects.

    Cached in the model's :class:`~tracing.state.ModelState`: it only depends on the embedding matrix.
    """
    state = state_of(model)
    if state.subject_std is None:
        from tracing.facts import known_facts

        subjects = sorted({fact.subject for fact in known_facts()})
        state.subject_std = subject_embedding_std(model, subjects)
    return multiplier * state.subject_std


def sample_noise(samples: int, n_tokens: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    """(samples, n_tokens, d_model) Gaussian noise with the given std, reproducible from ``seed``.

    Drawn on the CPU in float32 so the same seed gives the same noise on every device and dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, d_model, generator=generator) * std
