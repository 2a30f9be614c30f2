"""The bundled candidate facts (``tracing/data/fact_candidates.json``): relations with their prompt templates
and the (subject, answer) pairs they list, known to the embedded model or not. ``build_known_facts`` asks the
model about them; editors draw fact-shaped prompts that no evaluation reads from them.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tracing.facts import DATA_DIR, SLOT, evaluated_prompts

CANDIDATES_FILE = DATA_DIR / "fact_candidates.json"


@dataclass(frozen=True)
class Relation:
    """One relation of the candidates file: its prompts (its pairs are spread over its entries)."""

    relation_id: str
    template: str
    paraphrases: tuple[str, ...]
    generation: tuple[str, ...]


@dataclass(frozen=True)
class Candidate:
    """One ``(subject, answer)`` pair of a relation, before the model has been asked.

    ``entry`` is the index of the candidates-file entry that lists the pair: a record only draws on
    pairs of its relation from that entry and earlier ones.
    """

    relation: Relation
    subject: str
    answer: str
    entry: int

    @property
    def prompt(self) -> str:
        return fill(self.relation.template, self.subject)


def fill(template: str, subject: str) -> str:
    """The template with the subject in its ``{}`` slot."""
    return template.replace(SLOT, subject)


def load_candidates(path: Path) -> list[Candidate]:
    """Every pair of the candidates file, in file order (see the module docstring for the format)."""
    relations: dict[str, Relation] = {}
    subjects: dict[str, set[str]] = defaultdict(set)
    candidates = []
    for index, entry in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        relation_id = entry["relation"]
        if relation_id not in relations:
            templates = [entry["template"], *entry["paraphrases"], *entry["generation"]]
            bad = [t for t in templates if t.count(SLOT) != 1]
            if bad:
                raise ValueError(f"{relation_id}: templates need exactly one '{{}}': {bad}")
            relations[relation_id] = Relation(
                relation_id=relation_id,
                template=entry["template"],
                paraphrases=tuple(entry["paraphrases"]),
                generation=tuple(entry["generation"]),
            )
        else:
            extra = sorted(set(entry) - {"relation", "description", "pairs"})
            if extra:
                raise ValueError(f"{relation_id}: an entry extending the relation only takes pairs, not {extra}")
        for subject, answer in entry["pairs"]:
            if subject in subjects[relation_id]:
                raise ValueError(f"{relation_id}: subject {subject!r} is listed twice")
            subjects[relation_id].add(subject)
            candidates.append(Candidate(relations[relation_id], subject, answer, index))
    return candidates


def unused_fact_prompts(seed: int | None = None) -> list[str]:
    """Fact-shaped prompts about real subjects that no bundled record reads: the prompts of the candidate
    facts SmolLM2 does not know, minus :func:`evaluated_prompts`. An editor may train against them without
    touching any prompt an evaluation of the bundled facts reads; WISE's router does (the role EasyEdit
    gives to NQ questions from a training split). With ``seed``, shuffled by ``random.Random(seed)`` (an
    editor's draws take the first N)."""
    used = evaluated_prompts()
    prompts = dict.fromkeys(c.prompt for c in load_candidates(CANDIDATES_FILE))
    prompts = [prompt for prompt in prompts if prompt not in used]
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts


def relation_templates() -> dict[str, tuple[str, ...]]:
    """Per relation id of the bundled candidates, its prompt templates (main template and paraphrases,
    each with one ``{}``): the ways of asking about a subject that an edit of *another* relation must
    leave alone."""
    templates: dict[str, tuple[str, ...]] = {}
    for candidate in load_candidates(CANDIDATES_FILE):
        relation = candidate.relation
        templates.setdefault(relation.relation_id, (relation.template, *relation.paraphrases))
    return templates


def relation_subjects() -> dict[str, tuple[str, ...]]:
    """Per relation id of the bundled candidates, the subjects it lists (known to SmolLM2 or not)."""
    subjects: dict[str, list[str]] = {}
    for candidate in load_candidates(CANDIDATES_FILE):
        subjects.setdefault(candidate.relation.relation_id, []).append(candidate.subject)
    return {relation: tuple(names) for relation, names in subjects.items()}
