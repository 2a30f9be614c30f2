"""Tokenisation helpers that every stage shares, so BOS and leading-space rules live in one place.

* :func:`encode` applies the model's BOS policy (``model.cfg.default_prepend_bos``) itself instead of
  trusting each tokenizer's ``add_special_tokens`` default, which differs between families.
* :func:`subject_token_range` finds the subject by *character offsets*, so a subject that starts
  after a space, is glued to punctuation ("Tower's"), or sits after a BOS token is located the same way
  for every tokenizer.
* :func:`target_token_ids` tokenises an answer with one leading space, as ROME/MEMIT do (see there for
  the one convention every stage follows).
* :func:`right_padded` batches rows of ids by padding at the end (exact under causal attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tracing.placement import input_device


class SubjectNotFoundError(ValueError):
    """The subject string does not occur in the prompt."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's token ids and, per token, the character span it covers in the text (BOS: empty)."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor([self.ids], dtype=torch.long, device=device)


def _bos_id(model) -> int | None:
    if not model.cfg.default_prepend_bos:
        return None
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def encode_with_offsets(model, text: str) -> EncodedPrompt:
    tokenizer = model.tokenizer
    ids: list[int]
    offsets: list[tuple[int, int]]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(span) for span in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: recover them by decoding growing prefixes
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        offsets, previous = [], 0
        for i in range(len(ids)):
            end = len(tokenizer.decode(ids[: i + 1]))
            offsets.append((previous, end))
            previous = end
    bos = _bos_id(model)
    if bos is not None:
        ids = [bos] + ids
        offsets = [(0, 0)] + offsets
    return EncodedPrompt(text, tuple(ids), tuple(offsets))


def encode(model, text: str) -> list[int]:
    """Token ids of ``text`` with the model's BOS policy applied."""
    return list(encode_with_offsets(model, text).ids)


def subject_token_range(encoded: EncodedPrompt, subject: str, char_start: int | None = None) -> tuple[int, int]:
    """Half-open token range ``[start, end)`` covering ``subject`` inside ``encoded.text``.

    ``char_start`` pins which occurrence is meant (known exactly when the prompt came from a template);
    otherwise the first occurrence is used, as ROME does.
    """
    subject = subject.strip()
    if not subject:
        raise SubjectNotFoundError("the subject is empty")
    if char_start is None:
        char_start = encoded.text.find(subject)
        if char_start < 0:
            raise SubjectNotFoundError(
                f"subject {subject!r} does not occur in prompt {encoded.text!r}"
            )
    elif encoded.text[char_start: char_start + len(subject)] != subject:
        raise SubjectNotFoundError(f"subject {subject!r} is not at character {char_start} of {encoded.text!r}")
    char_end = char_start + len(subject)
    covering = [
        i for i, (a, b) in enumerate(encoded.offsets)
        if b > a and a < char_end and b > char_start  # non-empty span overlapping the subject
    ]
    if not covering:
        raise SubjectNotFoundError(f"no token of {encoded.text!r} covers subject {subject!r}")
    return covering[0], covering[-1] + 1


def target_token_ids(model, target: str) -> list[int]:
    """Token ids of an answer as it follows a prompt: exactly one leading space, no BOS.

    The convention, for every stage (editing, evaluation, tracing): a target is the answer's text; its
    surrounding whitespace is not part of it, and it is always read as ``" " + target.strip()``. That is
    ROME's (``rome_main`` prepends a space to a target that lacks one), so "Paris" and " Paris" are the
    same target, and the ids are the ones the model sees when the answer is written after the prompt
    (``encode(prompt + " " + target) == encode(prompt) + target_token_ids(target)`` for prompts that end
    in a word). Tokenising the bare text instead gives other ids for the first word of most targets."""
    if not target.strip():
        raise ValueError("the target is empty")
    text = " " + target.strip()
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def token_strings(model, ids) -> list[str]:
    """Readable per-token strings for plots (each token decoded on its own)."""
    return [model.tokenizer.decode([int(i)]) for i in ids]


def pad_id(tokenizer) -> int:
    """The token id batches are padded with: the tokenizer's pad token, else its end-of-text token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def right_padded(model, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """A (len(rows), max length) tensor, padded at the end.

    With causal attention a real token never attends to padding that comes after it, so every real
    position computes exactly what it would alone; no attention mask is needed.
    """
    pad = pad_id(model.tokenizer)
    width = max(len(r) for r in rows)
    device = input_device(model)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=device)
