"""Prompts that ask about an edited subject in *other* relations: what an edit of one relation must leave
alone ("Danielle Darrieux was born in" after "Danielle Darrieux's mother tongue is" -> English).

The relations and their templates (main template and paraphrases) are the bundled candidates' inventory
(:func:`tracing.candidates.relation_templates`), the same inventory WISE's subject negatives draw from.
Every prompt a bundled record's evaluation reads is left out (:func:`tracing.facts.evaluated_prompts`), so
training on these never teaches the answers the benchmarks score.
"""

from __future__ import annotations

import random
import zlib
from typing import Mapping, Sequence

from editing.wise.relations import Relations
from tracing.facts import SLOT, Fact, evaluated_prompts


def other_relation_templates(facts: Sequence[Fact], earlier: Sequence[Fact], count: int, seed: int = 0,
                             templates: Mapping[str, Sequence[str]] | None = None,
                             subjects: Mapping[str, Sequence[str]] | None = None) -> list[list[str]]:
    """Per fact, up to ``count`` templates (``{}`` for its subject) of relations not edited for that subject (in
    ``earlier`` or ``facts``), drawn reproducibly from ``seed`` and the subject. Relations that ask about
    the same kind of subject come first: those sharing a subject with the fact's relation in the inventory
    (a country's currency and language for a capital; a person's occupation for a mother tongue), then
    the rest, so the prompts are ones the subject's other facts are asked in."""
    if count <= 0:
        return [[] for _ in facts]
    if templates is None or subjects is None:
        from tracing.candidates import relation_subjects, relation_templates

        templates = relation_templates() if templates is None else templates
        subjects = relation_subjects() if subjects is None else subjects
    relations = Relations(templates)
    everything = [*earlier, *facts]
    edited = {(fact.subject, relations.relation_of(fact)) for fact in everything}
    reserved = evaluated_prompts() | {prompt for fact in everything for prompt in fact.prompts_read}
    chosen_per_fact = []
    for fact in facts:
        own = relations.relation_of(fact)
        kin = set(subjects.get(own, ()))
        others = [r for r in templates
                  if r != own and (fact.subject, r) not in edited and fact.template not in templates[r]]
        rng = random.Random(seed * 1_000_003 + zlib.crc32(fact.subject.encode()))
        chosen: list[str] = []
        for tier in ([r for r in others if kin & set(subjects.get(r, ()))], others):
            options = sorted({template for r in tier for template in templates[r]
                              if template.replace(SLOT, fact.subject) not in reserved} - set(chosen))
            chosen += rng.sample(options, min(count - len(chosen), len(options)))
        chosen_per_fact.append(chosen)
    return chosen_per_fact
