"""Portability: after an edit, does the model carry it over to questions that need it but do not restate it?

Two sources, both read from the dataset (never invented):

* MQuAKE (:class:`tracing.datasets.MultiHopCase`): a case's rewrites are edited together, and each of its
  multi-hop questions (usually three phrasings of one chain) should then be answered with ``new_answer`` or
  one of its aliases;
* KnowEdit: a record's ``portability`` prompts (kept in ``Fact.extra["portability"]`` as
  {kind: [[prompt, ground_truth], ...]}), each answered with its own ground truth, the record being one case.

Each question is scored in two of the evaluation's scorings:

* ``token``: teacher-forced token accuracy of the answer (the best over the answer and its aliases), as
  Rel / Gen are (:func:`editing.evaluate.read_continuations`);
* ``generated``: greedy generation from the question alone (:func:`editing.generated_answers.generated_continuations`,
  as many tokens as the longest accepted answer has, plus the same slack), a hit when the normalised
  continuation starts with the normalised answer or an alias (:func:`editing.generated_answers.starts_with_answer`).

Two shares per scoring: per question (the mean over every question) and per case (MQuAKE's multi-hop
accuracy: a case counts as answered when ANY of its questions is; under teacher forcing, a case's score is
the best of its questions'). The probability scoring has no portability: KnowEdit's probes carry no
alternative to compare the answer with.

A case is scored with the group of facts that holds its rewrites (one call under ``after_each``, the run
under ``after_all``); a group that holds only part of a case's rewrites is refused, so batching must keep
cases whole (:func:`editing.protocol.batches` with ``unit``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from editing.scoring import Scoring
from tracing.facts import Fact

PORTABILITY_SCORINGS = ("token", "generated")
COLUMNS = {"token": {"Port": "portability", "Port-case": "portability_case"},
           "generated": {"gen-Port": "portability", "gen-Port-case": "portability_case"}}


@dataclass(frozen=True)
class PortabilityCase:
    """The facts whose edit the questions need, and for each question the answers that count (first: the
    answer, then its aliases)."""

    case_id: int | str | None
    facts: tuple[Fact, ...]
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.questions or len(self.questions) != len(self.answers) or not all(self.answers):
            raise ValueError(f"portability case {self.case_id}: every question needs at least one answer")


def multi_hop_cases(cases: Sequence) -> list[PortabilityCase]:
    """MQuAKE cases (:func:`tracing.datasets.mquake_cases`): every question answered by ``new_answer`` or an
    alias of it."""
    def answers(case):
        return tuple(dict.fromkeys(a for a in (case.new_answer, *case.new_answer_aliases) if a.strip()))
    return [PortabilityCase(case.case_id, tuple(case.edits), tuple(case.questions),
                            tuple(answers(case) for _ in case.questions)) for case in cases]


def knowedit_cases(facts: Sequence[Fact]) -> list[PortabilityCase]:
    """One case per fact that carries KnowEdit portability prompts (every kind), each with its ground truth."""
    cases = []
    for fact in facts:
        probes = [pair for pairs in (fact.extra.get("portability") or {}).values() for pair in pairs]
        if probes:
            cases.append(PortabilityCase(fact.case_id, (fact,), tuple(p for p, _ in probes),
                                         tuple((a,) for _, a in probes)))
    return cases


def cases_in(cases: Sequence[PortabilityCase], facts: Sequence[Fact]) -> list[PortabilityCase]:
    """The cases whose facts are among ``facts`` (one call, or the run). A case only partly among them is
    refused: its questions need all of its rewrites."""
    facts = list(facts)
    chosen = []
    for case in cases:
        inside = [fact in facts for fact in case.facts]
        if all(inside):
            chosen.append(case)
        elif any(inside):
            raise ValueError(f"portability case {case.case_id}: only {sum(inside)} of its {len(inside)} rewrites "
                             "are in this group; a case's rewrites must be edited and scored together")
    return chosen


@dataclass(frozen=True)
class PortabilityReads:
    """Per case, the score of each of its questions (token accuracy, or 1.0 / 0.0 for a generated hit).
    Reads of several calls concatenate (:meth:`merge`), equal to one read of all their cases."""

    scores: tuple[tuple[float, ...], ...]

    @staticmethod
    def merge(parts: Sequence["PortabilityReads"]) -> "PortabilityReads":
        return PortabilityReads(tuple(case for part in parts for case in part.scores))

    def summary(self) -> dict:
        """``portability``: mean over questions; ``portability_case``: mean over cases of the best question
        (a case answered when any question is); None with no case (the caller shows no column then)."""
        questions = [score for case in self.scores for score in case]
        return {"portability": float(np.mean(questions)) if questions else None,
                "portability_case": float(np.mean([max(case) for case in self.scores])) if self.scores else None,
                "n_portability_questions": len(questions), "n_portability_cases": len(self.scores)}


def _split(cases: Sequence[PortabilityCase], values: Sequence[float]) -> PortabilityReads:
    scores, start = [], 0
    for case in cases:
        scores.append(tuple(values[start: start + len(case.questions)]))
        start += len(case.questions)
    return PortabilityReads(tuple(scores))


def token_portability(model, cases: Sequence[PortabilityCase]) -> PortabilityReads:
    """Teacher-forced token accuracy of each question's answer, the best over the answer and its aliases."""
    from editing.evaluate import read_continuations

    pairs = [(q, a) for case in cases for q, answers in zip(case.questions, case.answers) for a in answers]
    read = iter(read_continuations(model, pairs))
    best = [max(next(read).accuracy for _ in answers) for case in cases for answers in case.answers]
    return _split(cases, best)


def generated_portability(model, cases: Sequence[PortabilityCase], batch_size: int = 32) -> PortabilityReads:
    """Greedy generation from each question alone; a hit when it starts with the answer or an alias."""
    from editing.generated_answers import generated_continuations, starts_with_answer
    from tracing.tokens import target_token_ids

    questions = [(q, answers) for case in cases for q, answers in zip(case.questions, case.answers)]
    longest = [(q, max(answers, key=lambda a: len(target_token_ids(model, a)))) for q, answers in questions]
    continuations = generated_continuations(model, longest, batch_size=batch_size)
    decode = model.tokenizer.decode
    hits = [float(any(starts_with_answer(decode(tokens, skip_special_tokens=True), a) for a in answers))
            for tokens, (_, answers) in zip(continuations, questions)]
    return _split(cases, hits)


READERS = {"token": token_portability, "generated": generated_portability}


def portability_reads(model, scoring_name: str, cases: Sequence[PortabilityCase]) -> PortabilityReads:
    """The questions of ``cases`` read in one scoring (:data:`PORTABILITY_SCORINGS`)."""
    if scoring_name not in READERS:
        raise ValueError(f"no portability under the {scoring_name!r} scoring; expected one of "
                         f"{', '.join(PORTABILITY_SCORINGS)}")
    return READERS[scoring_name](model, cases) if cases else PortabilityReads(())


def with_portability(scoring: Scoring, cases: Sequence[PortabilityCase]) -> Scoring:
    """``scoring`` with portability columns: each read also scores the cases whose rewrites are in the group
    it reads, and the merged summary gains ``portability`` / ``portability_case`` and their counts. A scoring
    without portability (probability), or no cases, leaves it as it is."""
    if scoring.name not in PORTABILITY_SCORINGS or not cases:
        return scoring
    cases = tuple(cases)

    def read(model, facts, baseline, edited):
        return scoring.read(model, facts, baseline, edited), portability_reads(model, scoring.name,
                                                                                cases_in(cases, facts))

    def merge(parts):
        return {**scoring.merge([part for part, _ in parts]),
                **PortabilityReads.merge([reads for _, reads in parts]).summary()}

    columns = COLUMNS[scoring.name]
    return replace(scoring, columns={**scoring.columns, **columns}, plotted=(*scoring.plotted, *columns),
                   read=read, merge=merge)
