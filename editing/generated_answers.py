"""Generated-answer scoring: does the model *say* the answer when it writes on its own?

Teacher-forced token accuracy (:func:`editing.evaluate.evaluate_accuracy`) feeds the target's earlier tokens
to the model, so later tokens of a multi-token answer follow from the first and an edit looks better than
it is. Here the model writes greedily from the prompt alone, ``len(target tokens) + extra_tokens`` tokens
(the slack lets "Paris, France" or a different split of the same text still be read), and:

* gen-Rel / gen-Gen: a hit when the normalised continuation starts with the normalised new target (a plain
  prefix: what follows the target is not judged, so "Parisian" counts for "Paris", as teacher forcing
  would count the token " Paris" followed by anything); on the edit prompts / on their paraphrases;
* gen-Loc: on the locality prompts (:func:`editing.evaluate.locality_pairs`), a hit when the first
  ``len(answer tokens)`` generated tokens read the same, normalised, as the unedited model's, recorded
  before the first edit (:func:`generated_baseline`); 1.0 before any edit by construction.

Normalisation: lower case, whitespace collapsed to single spaces, stripped. Batches are left-padded
(:func:`editing.generate.greedy_continuations`); the hits do not depend on the batch size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from editing.evaluate import AccuracySummary, NoDataError, fact_locality_pairs, locality_pairs
from editing.generate import greedy_continuations
from tracing.facts import Fact
from tracing.tokens import target_token_ids

SCORING = "generated"
EXTRA_TOKENS = 2


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space, no surrounding whitespace."""
    return re.sub(r"\s+", " ", text).strip().lower()


def starts_with_answer(continuation: str, answer: str) -> bool:
    """Whether ``continuation`` begins with ``answer``, both :func:`normalise`\ d."""
    answer = normalise(answer)
    return bool(answer) and normalise(continuation).startswith(answer)


def generated_continuations(model, pairs: Sequence[tuple[str, str]], extra_tokens: int = EXTRA_TOKENS,
                            batch_size: int = 32) -> list[list[int]]:
    """Greedy tokens after each prompt: as many as its answer has, plus ``extra_tokens``."""
    counts = [len(target_token_ids(model, answer)) + extra_tokens for _, answer in pairs]
    return greedy_continuations(model, [prompt for prompt, _ in pairs], counts, batch_size)


def answer_hits(model, pairs: Sequence[tuple[str, str]], extra_tokens: int = EXTRA_TOKENS,
                batch_size: int = 32) -> list[bool]:
    """For each (prompt, answer): does the greedy continuation start with the answer?"""
    decode = model.tokenizer.decode
    continuations = generated_continuations(model, pairs, extra_tokens, batch_size)
    return [starts_with_answer(decode(tokens, skip_special_tokens=True), answer)
            for tokens, (_, answer) in zip(continuations, pairs)]


def _answer_window(model, tokens: Sequence[int], answer: str) -> str:
    return normalise(model.tokenizer.decode(list(tokens)[: len(target_token_ids(model, answer))],
                                            skip_special_tokens=True))


@dataclass(frozen=True)
class GeneratedBaseline:
    """The unedited model's generated answer windows on ``pairs`` (normalised text), recorded before the
    first edit; gen-Loc is agreement with these."""

    pairs: tuple[tuple[str, str], ...]
    answers: tuple[str, ...]


def generated_baseline(model, facts: Sequence[Fact], edited: Iterable[Fact] = (),
                       batch_size: int = 32) -> GeneratedBaseline:
    """Record the model's generated answers on the facts' locality pairs: call before the first edit."""
    pairs = tuple(locality_pairs(facts, edited))
    continuations = generated_continuations(model, pairs, batch_size=batch_size)
    return GeneratedBaseline(pairs, tuple(_answer_window(model, tokens, answer)
                                          for tokens, (_, answer) in zip(continuations, pairs)))


@dataclass(frozen=True)
class GeneratedHits:
    """Per-prompt hits of one scoring pass; passes over several calls of a run concatenate (:meth:`merge`)."""

    reliability: tuple[bool, ...]
    generalization: tuple[bool, ...]
    locality: tuple[bool, ...]

    @staticmethod
    def merge(parts: Sequence["GeneratedHits"]) -> "GeneratedHits":
        return GeneratedHits(*(tuple(hit for part in parts for hit in getattr(part, key))
                               for key in ("reliability", "generalization", "locality")))

    def summary(self) -> AccuracySummary:
        def mean(hits):
            return float(np.mean(hits)) if hits else None
        return AccuracySummary(len(self.reliability), mean(self.reliability), mean(self.generalization),
                               mean(self.locality), len(self.generalization), len(self.locality), SCORING)


def generated_hits(model, facts: Sequence[Fact], baseline: GeneratedBaseline, edited: Iterable[Fact] = (),
                   batch_size: int = 32) -> GeneratedHits:
    """Hits on the edit prompts, the paraphrases and the locality prompts (see the module docstring)."""
    if not facts:
        raise NoDataError("no facts to evaluate")
    pairs = locality_pairs(facts, edited)
    if tuple(pairs) != baseline.pairs:
        raise ValueError("the baseline was recorded on other prompts than these")
    para = [(p, f.target_new) for f in facts for p in f.paraphrases]
    reliability = answer_hits(model, [(f.prompt, f.target_new) for f in facts], batch_size=batch_size)
    generalization = answer_hits(model, para, batch_size=batch_size) if para else []
    continuations = generated_continuations(model, pairs, batch_size=batch_size)
    locality = [_answer_window(model, tokens, answer) == before
                for tokens, (_, answer), before in zip(continuations, pairs, baseline.answers)]
    return GeneratedHits(tuple(reliability), tuple(generalization), tuple(locality))


def evaluate_generated(model, facts: Sequence[Fact], baseline: GeneratedBaseline, edited: Iterable[Fact] = (),
                       batch_size: int = 32) -> AccuracySummary:
    """gen-Rel / gen-Gen / gen-Loc of ``facts`` now, locality against ``baseline`` (:func:`generated_baseline`
    with the same ``edited``). Records with no paraphrase or no locality prompt at all raise
    :class:`NoDataError`, as :func:`editing.evaluate.evaluate_accuracy` does."""
    if facts and not any(f.paraphrases for f in facts):
        raise NoDataError("generalization: none of these facts has a paraphrase prompt")
    if facts and not any(fact_locality_pairs(f) for f in facts):
        raise NoDataError("locality: none of these facts has a locality or neighbourhood prompt")
    return generated_hits(model, facts, baseline, edited, batch_size).summary()
