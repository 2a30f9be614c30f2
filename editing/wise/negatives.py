"""The prompts WISE's router is trained to leave on the main memory, drawn anew for each edit call.

Margins against unrelated text alone do not keep other facts out of a side memory: each call also trains
against fact-shaped prompts about subjects nobody edits, against the edited subjects in other relations
and against the edited relations about other subjects (docs/wise.md has the measurements). None of them
is ever a prompt an evaluation or the threshold calibration reads.
"""

from __future__ import annotations

import random
from typing import Callable, Mapping, Sequence

import torch

from editing.wise.config import WiseConfig
from editing.wise.relations import Relations, naming_none
from tracing.candidates import unused_fact_prompts
from tracing.facts import SLOT, Fact
from tracing.state import text_cache


@torch.no_grad()
def unrelated_texts(model, prefixes: Sequence[str], length: int, seed: int) -> list[str]:
    """One short model-written text per prefix (top-5 sampling). Cached on the model object, like MEMIT's
    context templates: they depend only on the model and the seed, and sampling is the slow part of
    :meth:`WiseEditor.attach`."""
    from editing.generate import sample_continuations

    cache = text_cache(model, "unrelated_texts")
    key = (tuple(prefixes), length, seed)
    if key not in cache:
        cache[key] = sample_continuations(model, list(prefixes), length, top_k=5, seed=seed)
    return list(cache[key])


def prompt_pools(config: WiseConfig, negatives: Sequence[str] | None,
                 calibration: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The negative and the calibration prompts: those given, else ``config.negatives`` /
    ``config.calibration`` disjoint draws from :func:`tracing.candidates.unused_fact_prompts`."""
    if negatives is None or calibration is None:
        pool = unused_fact_prompts(config.seed)
        if negatives is None:
            negatives = pool[: config.negatives]
        if calibration is None:
            taken = set(negatives)
            pool = [prompt for prompt in pool if prompt not in taken]
            calibration = pool[: config.calibration]
    return list(negatives), list(calibration)


class NegativeSampler:
    """Draws each edit call's negatives.

    ``prompts`` / ``rows``: the pool of fact prompts about unedited subjects and their (keys, valid);
    ``relations`` / ``subjects``: the templates and, per relation, the subjects the subject and relation
    negatives are built from; ``calibration``: the calibration prompts (no negative names their subjects);
    ``reserved``: prompts never trained on (what evaluations and the calibration read)."""

    def __init__(self, prompts: Sequence[str], rows: tuple[torch.Tensor, torch.Tensor], relations: Relations,
                 subjects: Mapping[str, Sequence[str]], calibration: Sequence[str], reserved: set[str],
                 config: WiseConfig) -> None:
        self.prompts, self.rows, self.relations, self.subjects = prompts, rows, relations, subjects
        self.calibration, self.reserved, self.config = calibration, reserved, config

    def pool_rows(self, facts: Sequence[Fact], n_edits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, valid) of ``negatives_per_edit`` pool prompts for the call after ``n_edits`` edits, none
        naming a subject of ``facts``."""
        allowed = naming_none(self.prompts, {fact.subject for fact in facts})
        rng = random.Random(self.config.seed * 7919 + n_edits)
        chosen = rng.sample(allowed, min(self.config.negatives_per_edit, len(allowed)))
        keys, valid = self.rows
        return keys[chosen], valid[chosen]

    def fact_prompts(self, facts: Sequence[Fact], edited: Sequence[Fact], n_edits: int) -> list[str]:
        """The subject negatives, then the relation negatives, of ``facts`` (``edited``: the facts edited
        in earlier calls)."""
        return self.subject_prompts(facts, edited, n_edits) + self.relation_prompts(facts, edited, n_edits)

    def subject_prompts(self, facts: Sequence[Fact], edited: Sequence[Fact], n_edits: int) -> list[str]:
        """``subject_negatives`` prompts per fact that ask about its subject in another relation: the side
        memory must answer to the fact, not to its subject alone. Left out: the relations edited for that
        subject so far (``edited`` and ``facts``)."""
        templates = self.relations.templates

        def options(fact: Fact, pairs: set[tuple[str, str | None]]) -> set[str]:
            return {template.replace(SLOT, fact.subject) for relation, group in templates.items()
                    if (fact.subject, relation) not in pairs for template in group}

        return self._draw(facts, edited, n_edits, self.config.subject_negatives, 104_729, options)

    def relation_prompts(self, facts: Sequence[Fact], edited: Sequence[Fact], n_edits: int) -> list[str]:
        """``relation_negatives`` prompts per fact that ask its relation's question (any of its templates)
        about another subject: the side memory must answer to the subject too, not to the relation alone.
        Left out: subjects edited in that relation, and subjects any calibration prompt names (the floor
        must stay an unbiased sample)."""
        calibrated = {parsed[0] for parsed in map(self.relations.parse, self.calibration) if parsed}

        def options(fact: Fact, pairs: set[tuple[str, str | None]]) -> set[str]:
            relation = self.relations.relation_of(fact)
            return {template.replace(SLOT, subject) for subject in self.subjects.get(relation, ())
                    if (subject, relation) not in pairs and subject not in calibrated
                    for template in self.relations.templates.get(relation, ())}

        return self._draw(facts, edited, n_edits, self.config.relation_negatives, 130_363, options)

    def _draw(self, facts: Sequence[Fact], edited: Sequence[Fact], n_edits: int, count: int, salt: int,
              options: Callable[[Fact, set[tuple[str, str | None]]], set[str]]) -> list[str]:
        """``count`` of ``options(fact, pairs)`` per fact, reproducibly drawn per call, none of them reserved
        or read by an evaluation of an edited fact. ``pairs`` holds the (subject, relation) pairs edited so
        far, this call's included."""
        if not count:
            return []
        everything = [*edited, *facts]
        pairs = {(fact.subject, self.relations.relation_of(fact)) for fact in everything}
        reserved = self.reserved | {prompt for fact in everything for prompt in fact.prompts_read}
        rng = random.Random(self.config.seed * salt + n_edits)
        prompts = []
        for fact in facts:
            choices = sorted(options(fact, pairs) - reserved)
            prompts += rng.sample(choices, min(count, len(choices)))
        return prompts
