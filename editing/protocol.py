"""Edit a run of facts with one editor and score it under a protocol, with any of the scorings.

* ``after_all`` (WISE, EasyEdit ``--sequential_edit``; one call of every fact is MEMIT's batch editing):
  the facts are edited in calls of ``batch``, and all of them are scored after the last call;
* ``after_each`` (AlphaEdit): each call's facts are scored right after that call, and the reads merged.

Whatever a scoring compares with the unedited model is recorded before the first edit, on the prompts it
will read. Prompts edited anywhere in the run are never read as locality prompts.

``unit`` keeps facts together: consecutive facts with the same ``unit(fact)`` (an MQuAKE case's rewrites,
whose multi-hop questions need all of them) are one unit, ``batch`` counts units, and no call splits one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from editing.scoring import Scoring
from tracing.facts import Fact

PROTOCOLS = ("after_all", "after_each")


def batches(facts: Sequence, size: int, unit: Callable[[Fact], Hashable] | None = None) -> list[list]:
    """``facts`` in consecutive calls of ``size`` (the last may be shorter). With ``unit``, ``size`` counts
    runs of consecutive facts with the same ``unit(fact)``, and each run stays in one call."""
    if size < 1:
        raise ValueError(f"the batch size must be >= 1, got {size}")
    if unit is None:
        return [list(facts[i: i + size]) for i in range(0, len(facts), size)]
    units: list[list] = []
    for fact in facts:
        if units and unit(units[-1][-1]) == unit(fact):
            units[-1].append(fact)
        else:
            units.append([fact])
    return [[fact for group in units[i: i + size] for fact in group] for i in range(0, len(units), size)]


def record_unedited(model, facts: Sequence[Fact], scorings: Sequence[Scoring]) -> dict[str, Any]:
    """What each scoring compares with the unedited model, recorded on the model as it is, for ``facts``
    read as one group (the ``after_all`` reading, and the unedited row)."""
    return {s.name: s.record(model, facts, facts) for s in scorings}


def score_now(model, facts: Sequence[Fact], scorings: Sequence[Scoring],
              recorded: dict[str, Any] | None = None) -> dict[str, dict]:
    """Every scoring of ``facts`` on the model as it is (the unedited row of a table: locality 1.0).
    ``recorded``: :func:`record_unedited` of the same facts, if the caller already has it."""
    recorded = record_unedited(model, facts, scorings) if recorded is None else recorded
    return {s.name: s.merge([s.read(model, facts, recorded[s.name], facts)]) for s in scorings}


@dataclass(frozen=True)
class RunResult:
    scores: dict[str, dict]  # scoring name -> summary dict
    calls: int
    seconds_editing: float


def edit_and_score(model, editor, facts: Sequence[Fact], batch: int, protocol: str,
                   scorings: Sequence[Scoring], unit: Callable[[Fact], Hashable] | None = None,
                   recorded: dict[str, Any] | None = None) -> RunResult:
    """Edit ``facts`` with ``editor`` in calls of ``batch`` (units, with ``unit``: see :func:`batches`) and
    score them under ``protocol`` (the edits stay; the caller undoes them). ``recorded``: the unedited
    model's :func:`record_unedited` of ``facts``, reused under ``after_all`` instead of recording it again
    (it must have been taken before any edit of this run)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    facts = list(facts)
    calls = batches(facts, batch, unit)
    if protocol == "after_all":
        baselines = [record_unedited(model, facts, scorings) if recorded is None else recorded]
    else:
        baselines = [{s.name: s.record(model, call, facts) for s in scorings} for call in calls]
    reads: dict[str, list] = {s.name: [] for s in scorings}
    seconds = 0.0
    for call in calls:
        started = time.perf_counter()
        editor.edit(call)
        seconds += time.perf_counter() - started
        if protocol == "after_each":
            for s in scorings:
                reads[s.name].append(s.read(model, call, baselines[len(reads[s.name])][s.name], facts))
    if protocol == "after_all":
        for s in scorings:
            reads[s.name].append(s.read(model, facts, baselines[0][s.name], facts))
    return RunResult({s.name: s.merge(reads[s.name]) for s in scorings}, len(calls), seconds)
