"""What an edit asks, read where the relation has formed: the relation check of the subject memory and of
WISE's subject gate.

A gate on the subject's spelling lets an edit answer on every prompt that names its subject, including
the subject's other relations ("{subject} was born in" after an edit of "{subject}'s mother tongue is").
The relation check lets an edit answer only where a position *after* its subject asks the edit's
relation: the residual at ``layer`` there is at least a threshold similar (cosine, centred) to the edit's
relation key. The key is the centred residual at the last token of the edit prompt, averaged over the
context templates, with the direction of the bare subject projected out, so that the subject's other
questions do not match on the subject they share. At 0.8 of the depth (layer 24 of SmolLM2's 30) this
separates an edit's paraphrases from prompts about its subject in other relations with AUC 0.94 (0.82 at
layer 5; docs/subject_memory.md). The centre is the mean last-token state of held-out fact prompts: at late
layers position 0 (the attention sink) has ~50x the norm of other states and would dominate a mean over
all positions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from editing.prompts import in_context
from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.facts import SLOT, Fact
from tracing.hooks import hooks_suspended
from tracing.tokens import encode, right_padded

RELATION_DEPTH = 0.8  # where WISE's check reads by default: layer 24 of SmolLM2's 30 (docs/subject_memory.md)


def default_relation_layer(n_layers: int, depth: float = RELATION_DEPTH) -> int:
    """The layer at ``depth`` (a fraction) of a model with ``n_layers`` blocks."""
    return int(depth * n_layers)


@torch.no_grad()
def unedited_states(model, rows: Sequence[Sequence[int]], layer: int,
                    positions: Sequence[int] | None = None) -> torch.Tensor:
    """The residual after ``layer`` as the model computes it with every hook suspended (editors' hooks
    included), also from inside a hook of an enclosing forward (:func:`tracing.hooks.hooks_suspended`)."""
    with hooks_suspended(model):
        return activations_at(model, rows, ModelAdapter.resid_out(layer), layer + 1, positions=positions,
                              batch_size=64)


@torch.no_grad()
def unedited_reads(model, rows: Sequence[Sequence[int]], layer: int, answers: Sequence[int],
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the unedited model to the end (every hook suspended, as :func:`unedited_states`):
    the residual after ``layer`` at every position, (rows, width, d_model), and the log-probability of
    each token of ``answers`` as the next token at every position, (rows, width, len(answers)); padding
    positions are zeros."""
    width = max(len(row) for row in rows)
    states, log_probs = [], []
    name = ModelAdapter.resid_out(layer)
    with hooks_suspended(model):
        for start in range(0, len(rows), batch_size):
            captured: dict[str, torch.Tensor] = {}

            def keep(value: torch.Tensor, hook) -> None:
                captured["value"] = value.detach().float()

            logits = model.run_with_hooks(right_padded(model, rows[start: start + batch_size]),
                                          fwd_hooks=[(name, keep)])
            read = torch.log_softmax(logits.float(), -1)[..., list(answers)]
            pad = width - read.shape[1]
            states.append(torch.nn.functional.pad(captured["value"], (0, 0, 0, pad)))
            log_probs.append(torch.nn.functional.pad(read, (0, 0, 0, pad)))
    return torch.cat(states), torch.cat(log_probs)


class RelationKeys:
    """Per edit a unit direction of what it asks, at one layer, and the similarity of states to it."""

    def __init__(self, layer: int, centre: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        self.layer = layer
        self.centre = centre.detach().float().cpu()
        self.keys = keys  # (edits, d_model), unit norm

    @classmethod
    def calibrated(cls, model, layer: int, prompts: Sequence[str]) -> "RelationKeys":
        """Keys centred on the mean state at the last token of ``prompts`` (held-out fact prompts)."""
        rows = [encode(model, prompt) for prompt in prompts] or [encode(model, "The")]
        return cls(layer, unedited_states(model, rows, layer, [len(r) - 1 for r in rows]).mean(0))

    def __len__(self) -> int:
        return 0 if self.keys is None else len(self.keys)

    def unit(self, states: torch.Tensor) -> torch.Tensor:
        """Centred, unit-norm states (any leading shape)."""
        return torch.nn.functional.normalize(states.float() - self.centre.to(states.device), dim=-1)

    def make(self, model, requests: Sequence[Fact], contexts: Sequence[str], states=None) -> torch.Tensor:
        """(n, d_model) unit keys of ``requests`` (module docstring). ``states(rows, positions)``: how the
        residual at :attr:`layer` is read (default :func:`unedited_states`)."""
        read = states or (lambda rows, positions: unedited_states(model, rows, self.layer, positions))
        contexts = list(contexts) or [SLOT]
        rows = [encode(model, in_context(c, fact.template).replace(SLOT, fact.subject))
                for fact in requests for c in contexts]
        asks = self.unit(read(rows, [len(r) - 1 for r in rows]))
        asks = torch.stack([group.mean(0) for group in torch.split(asks, len(contexts))])
        bare = [encode(model, fact.subject) for fact in requests]
        subject = self.unit(read(bare, [len(r) - 1 for r in bare]))
        asks = asks - (asks * subject).sum(-1, keepdim=True) * subject
        return torch.nn.functional.normalize(asks, dim=-1).cpu()

    def add(self, keys: torch.Tensor) -> None:
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])

    def similarity(self, states: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """(matches, positions) similarity of each match's states (matches, positions, d_model) to the key
        of its entry."""
        if self.keys is None or (len(entries) and int(entries.max()) >= len(self.keys)):
            raise RuntimeError("relation keys are missing for some edits")
        keys = self.keys.to(states.device)[entries]
        return torch.einsum("mpd,md->mp", self.unit(states), keys)


def later_best(similarity: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
               none: float = -2.0) -> torch.Tensor:
    """(matches,) the best similarity at a real position after each match's position; ``none`` where there
    is none (the subject ends the text)."""
    index = torch.arange(similarity.shape[1], device=similarity.device)
    later = (index[None, :] > positions[:, None]) & real
    return similarity.masked_fill(~later, none).amax(-1)


def running_best(similarity: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(matches, width) at each position t the best similarity over the positions after the match's
    position up to t (causal: a later token never changes an earlier position); -2 before any."""
    index = torch.arange(similarity.shape[1], device=similarity.device)
    return similarity.masked_fill(index[None, :] <= positions[:, None], -2.0).cummax(-1).values
