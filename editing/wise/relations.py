"""Which subject and relation a prompt asks about, told from the relations' prompt templates.

WISE's negatives (the subject in other relations, the relation about other subjects) and its calibration
scope (a prompt about an edited subject in another relation is out of scope) both need it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from tracing.facts import SLOT, Fact


class Relations:
    """Prompt templates (``{}`` for the subject) per relation id; parses are cached."""

    def __init__(self, templates: Mapping[str, Sequence[str]]) -> None:
        self.templates = templates
        self._parsed: dict[str, tuple[str, str] | None] = {}

    def parse(self, prompt: str) -> tuple[str, str] | None:
        """(subject, relation id) of a prompt that fills one of the templates; None if none fits."""
        cache = self._parsed
        if prompt not in cache:
            fits = []
            for relation, templates in self.templates.items():
                for template in templates:
                    head, tail = template.split(SLOT)
                    if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
                        fits.append((len(head) + len(tail), prompt[len(head): len(prompt) - len(tail)], relation))
            cache[prompt] = max(fits)[1:] if fits else None
        return cache[prompt]

    def relation_of(self, fact: Fact) -> str | None:
        """The fact's relation id, or that of the relation whose templates include its template."""
        if fact.relation in self.templates:
            return fact.relation
        return next((r for r, templates in self.templates.items() if fact.template in templates), fact.relation)


def naming_none(prompts: Sequence[str], subjects: set[str]) -> list[int]:
    """Indices of the prompts that contain none of ``subjects``."""
    return [i for i, prompt in enumerate(prompts) if not any(subject in prompt for subject in subjects)]
