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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tracing.facts import Fact

SCORINGS = ("probability", "token", "generated")


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


def _token() -> Scoring:
    from editing.evaluate import evaluate_accuracy, locality_predictions, merge_accuracy

    return Scoring("token", {"Rel": "reliability", "Gen": "generalization", "Loc": "locality"},
                   ("Rel", "Gen", "Loc"), record=locality_predictions, read=evaluate_accuracy,
                   merge=lambda parts: merge_accuracy(parts).as_dict())


def _generated() -> Scoring:
    from editing.generated_answers import GeneratedHits, generated_baseline, generated_hits

    return Scoring("generated", {"gen-Rel": "reliability", "gen-Gen": "generalization", "gen-Loc": "locality"},
                   ("gen-Rel", "gen-Gen", "gen-Loc"), record=generated_baseline, read=generated_hits,
                   merge=lambda parts: GeneratedHits.merge(parts).summary().as_dict())


def scoring(name: str) -> Scoring:
    """The scoring called ``name`` (one of :data:`SCORINGS`)."""
    makers = {"probability": _probability, "token": _token, "generated": _generated}
    if name not in makers:
        raise ValueError(f"unknown scoring {name!r}; expected one of {', '.join(SCORINGS)}")
    return makers[name]()
