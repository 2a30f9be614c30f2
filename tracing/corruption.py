"""How the subject is corrupted: ROME's Gaussian noise, or symmetric token replacement.

Both are one tensor added to the subject's token embeddings (``embed.hook_out``) in every corrupted row,
so the engines, the verification and attribution patching treat them alike:

* ``gaussian`` (ROME, the default): noise of std ``3 x`` the subject-embedding std, ``samples`` draws.
* ``symmetric`` (Zhang & Nanda 2023): the subject swapped for other subjects of the bundled known facts
  that take exactly as many tokens *in this prompt* (every other token unchanged); one corrupted row per
  replacement subject, up to ``samples`` of them, chosen reproducibly from ``seed``. The added tensor is
  ``embed(replacement) - embed(subject)``, so a corrupted row equals the replaced prompt's embeddings
  (to float rounding) while hooks that read token ids still see the original prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tracing.noise import sample_noise
from tracing.placement import input_device
from tracing.tokens import EncodedPrompt, encode_with_offsets

CORRUPTIONS = ("gaussian", "symmetric")


class NoReplacementError(ValueError):
    """Symmetric replacement found no subject with as many tokens as the traced one."""


def check_corruption(corruption: str) -> None:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}")


@dataclass(frozen=True)
class Corruption:
    """What the corrupted rows add to the subject's token embeddings, and what it was."""

    kind: str
    delta: torch.Tensor  # (rows, subject tokens, d_model), float32 on the CPU
    noise: float  # the Gaussian std (0 for symmetric replacement)
    replacements: tuple[str, ...] = ()  # the subjects swapped in (symmetric replacement)

    @property
    def rows(self) -> int:
        return int(self.delta.shape[0])


def gaussian(samples: int, n_tokens: int, d_model: int, std: float, seed: int) -> Corruption:
    """ROME's corruption: ``samples`` draws of Gaussian noise (see :func:`tracing.noise.sample_noise`)."""
    return Corruption("gaussian", sample_noise(samples, n_tokens, d_model, std, seed), std)


def replacement_subjects(model, encoded: EncodedPrompt, subject: str, char_start: int,
                         subject_range: tuple[int, int], samples: int, seed: int) -> list[tuple[str, list[int]]]:
    """Up to ``samples`` bundled subjects that can stand in ``subject``'s place: the prompt with the
    replacement (at character ``char_start``) has the same tokens except exactly the subject's, and as
    many of them. Returns
    (subject, its token ids in the prompt) pairs; raises :class:`NoReplacementError` if there is none."""
    from tracing.facts import known_facts

    subject = subject.strip()
    start, end = subject_range
    before, after = encoded.text[:char_start], encoded.text[char_start + len(subject):]
    candidates = sorted({f.subject.strip() for f in known_facts()} - {subject})
    random.Random(seed).shuffle(candidates)
    found: list[tuple[str, list[int]]] = []
    for candidate in candidates:
        if candidate.lower() == subject.lower():
            continue
        ids = encode_with_offsets(model, before + candidate + after).ids
        if len(ids) == len(encoded.ids) and ids[:start] == encoded.ids[:start] and ids[end:] == encoded.ids[end:] \
                and ids[start:end] != encoded.ids[start:end]:
            found.append((candidate, list(ids[start:end])))
            if len(found) == samples:
                break
    if not found:
        raise NoReplacementError(
            f"corruption 'symmetric': no subject of the bundled known facts takes the same {end - start} "
            f"token(s) as {subject!r} in prompt {encoded.text!r}; use corruption 'gaussian'")
    return found


@torch.no_grad()
def symmetric(model, encoded: EncodedPrompt, subject: str, char_start: int, subject_range: tuple[int, int],
              samples: int, seed: int) -> Corruption:
    """Symmetric token replacement as an embedding difference (see the module doc)."""
    found = replacement_subjects(model, encoded, subject, char_start, subject_range, samples, seed)
    device = input_device(model)
    start, end = subject_range
    original = model.embed(torch.tensor([list(encoded.ids[start:end])], device=device)).float()
    replaced = model.embed(torch.tensor([ids for _, ids in found], device=device)).float()
    return Corruption("symmetric", (replaced - original).cpu(), 0.0, tuple(name for name, _ in found))
