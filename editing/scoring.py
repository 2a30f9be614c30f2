"""The three scorings of an edit, side by side, behind one shape so a protocol can run any of them.

* ``probability`` (CounterFact, :func:`editing.evaluate.counterfact_cases`): ES / PS / NS, whether the new
  target is more likely than the true one (neighbours: the other way round), and their magnitudes EM / PM / NM;
* ``token`` (zsRE, WISE, EasyEdit, :func:`editing.evaluate.evaluate_accuracy`): Rel / Gen / Loc, the share of
  target tokens that are the argmax under teacher forcing, locality against the unedited model;
* ``generated`` (:mod:`editing.generated_answers`): gen-Rel / gen-Gen / gen-Loc, whether greedy generation
  from the prompt alone starts with the target, locality against the unedited model's generations.

Each :class:`Scoring` records what it needs from the unedited model (``record``, before the first edit),
reads one group of facts (``read``; the facts of one call, or of the whole run) and merges the reads of
several groups into one summary dict (``merge``) equal to one read of all their facts.

A dataset with no paraphrase or no locality prompt at all (MQuAKE has neither) gets its scorings without
those columns (``absent``, :func:`absent_metrics`): no column and no key, rather than an error or a NaN.
Portability columns are added by :func:`editing.portability.with_portability`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Sequence

from tracing.facts import Fact

SCORINGS = ("probability", "token", "generated")
METRICS_THAT_NEED_DATA = ("generalization", "locality")
ABSENT_COLUMNS = {  # scoring -> metric without data -> the columns it takes away
    "probability": {"generalization": ("PS", "PM", "score"), "locality": ("NS", "NM", "score")},
    "token": {"generalization": ("Gen",), "locality": ("Loc",)},
    "generated": {"generalization": ("gen-Gen",), "locality": ("gen-Loc",)},
}


@dataclass(frozen=True)
class Scoring:
    name: str
    columns: dict[str, str]  # table column -> key of the summary dict
    plotted: tuple[str, ...]  # columns that are rates in [0, 1]
    record: Callable[[Any, Sequence[Fact], Sequence[Fact]], Any]  # (model, facts, edited) -> baseline
    read: Callable[[Any, Sequence[Fact], Any, Sequence[Fact]], Any]  # (model, facts, baseline, edited)
    merge: Callable[[list], dict]


def _probability() -> Scoring:
    from editing.evaluate import METRICS, counterfact_cases, summarize_counterfact

    return Scoring("probability", {m: m for m in METRICS}, ("ES", "PS", "NS", "score"),
                   record=lambda model, facts, edited: None,
                   read=lambda model, facts, baseline, edited: counterfact_cases(model, facts, edited=edited),
                   merge=lambda parts: summarize_counterfact([case for part in parts for case in part]).as_dict())


def _token(required: Sequence[str] = METRICS_THAT_NEED_DATA) -> Scoring:
    from editing.evaluate import evaluate_accuracy, locality_predictions, merge_accuracy

    def read(model, facts, baseline, edited):
        return evaluate_accuracy(model, facts, baseline, edited, required=required)

    return Scoring("token", {"Rel": "reliability", "Gen": "generalization", "Loc": "locality"},
                   ("Rel", "Gen", "Loc"), record=locality_predictions, read=read,
                   merge=lambda parts: merge_accuracy(parts).as_dict())


def _generated() -> Scoring:
    from editing.generated_answers import GeneratedHits, generated_baseline, generated_hits

    return Scoring("generated", {"gen-Rel": "reliability", "gen-Gen": "generalization", "gen-Loc": "locality"},
                   ("gen-Rel", "gen-Gen", "gen-Loc"), record=generated_baseline, read=generated_hits,
                   merge=lambda parts: GeneratedHits.merge(parts).summary().as_dict())


def absent_metrics(facts: Sequence[Fact]) -> frozenset[str]:
    """The metrics none of ``facts`` has prompts for: ``generalization`` (no paraphrase), ``locality`` (no
    locality or neighbourhood prompt)."""
    from editing.evaluate import fact_locality_pairs

    absent = set()
    if not any(fact.paraphrases for fact in facts):
        absent.add("generalization")
    if not any(fact_locality_pairs(fact) for fact in facts):
        absent.add("locality")
    return frozenset(absent)


def scoring(name: str, absent: Collection[str] = ()) -> Scoring:
    """The scoring called ``name`` (one of :data:`SCORINGS`), without the columns of the ``absent`` metrics
    (:func:`absent_metrics`; their keys are left out of the summary too)."""
    makers = {"probability": _probability, "token": _token, "generated": _generated}
    if name not in makers:
        raise ValueError(f"unknown scoring {name!r}; expected one of {', '.join(SCORINGS)}")
    unknown = set(absent) - set(METRICS_THAT_NEED_DATA)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected some of {', '.join(METRICS_THAT_NEED_DATA)}")
    if not absent:
        return makers[name]()
    made = _token([m for m in METRICS_THAT_NEED_DATA if m not in absent]) if name == "token" else makers[name]()
    dropped = {column for metric in absent for column in ABSENT_COLUMNS[name][metric]}
    keys = {made.columns[column] for column in dropped}

    def merge(parts):
        return {key: value for key, value in made.merge(parts).items() if key not in keys}

    return replace(made, columns={c: k for c, k in made.columns.items() if c not in dropped},
                   plotted=tuple(c for c in made.plotted if c not in dropped), merge=merge)
