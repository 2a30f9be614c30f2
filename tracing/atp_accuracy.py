"""How far attribution patching is from exact tracing: Pearson r and top-k agreement per kind over facts.

Each fact is traced twice with the same corruption, metric and direction, once exactly and once by AtP
(:mod:`tracing.attribution`), and the indirect effects are compared over the cells from the subject's
first token on (earlier cells are exactly 0 in both and would only inflate the agreement).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from tracing.average import average_indirect_effect
from tracing.causal_trace import FactTrace, TraceConfig, trace_fact
from tracing.facts import Fact


@dataclass(frozen=True)
class KindAccuracy:
    """AtP against exact tracing for one kind of state."""

    kind: str
    pearson: float  # mean over facts of the per-fact Pearson r of the indirect effects
    pearson_pooled: float  # one Pearson r over every fact's cells together
    top_k: float  # mean share of the exact top-k cells (largest effects) that AtP also ranks in its top k
    k: int
    curve_pearson: float  # Pearson r of the AIE curves at the last subject token (what locate chooses from)
    n_facts: int


@dataclass(frozen=True)
class AtpAccuracy:
    """The comparison over ``n_facts`` facts, with the time each method took in all."""

    kinds: dict[str, KindAccuracy]
    n_facts: int
    exact_seconds: float
    atp_seconds: float
    config: TraceConfig

    @property
    def speedup(self) -> float:
        return self.exact_seconds / self.atp_seconds if self.atp_seconds > 0 else float("inf")

    def as_record(self) -> dict:
        """A JSON-ready dict (NaN where a correlation is undefined, e.g. a constant heatmap)."""
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("show_progress", "verify", "method")}
        return {"n_facts": self.n_facts, "exact_seconds": self.exact_seconds, "atp_seconds": self.atp_seconds,
                "speedup": self.speedup, "config": config,
                "kinds": {kind: dataclasses.asdict(value) for kind, value in self.kinds.items()}}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two arrays (flattened); NaN where either is constant."""
    a, b = np.ravel(a).astype(float), np.ravel(b).astype(float)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def top_k_agreement(estimate: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Share of the ``k`` cells with the largest exact effect that are among the estimate's ``k`` largest."""
    k = min(k, np.size(exact))
    best = set(np.argsort(-np.ravel(exact), kind="stable")[:k])
    return len(best & set(np.argsort(-np.ravel(estimate), kind="stable")[:k])) / k


def _cells(trace: FactTrace, kind: str) -> np.ndarray:
    return trace.indirect_effect(kind)[trace.subject_range[0]:]


def compare_traces(exact: Sequence[FactTrace], atp: Sequence[FactTrace], kind: str, k: int = 10) -> KindAccuracy:
    """Agreement of AtP traces with exact traces of the same facts, for ``kind``."""
    pairs = list(zip(exact, atp, strict=True))
    per_fact = [pearson(_cells(a, kind), _cells(e, kind)) for e, a in pairs]
    pooled = pearson(np.concatenate([_cells(a, kind).ravel() for _, a in pairs]),
                     np.concatenate([_cells(e, kind).ravel() for e, _ in pairs]))
    agreement = [top_k_agreement(_cells(a, kind), _cells(e, kind), k) for e, a in pairs]
    curves = [average_indirect_effect(traces, kind, only_correct=False).role("last subject token")
              for traces in (exact, atp)]
    mean_r = float(np.nanmean(per_fact)) if not np.isnan(per_fact).all() else float("nan")
    return KindAccuracy(kind, mean_r, pooled, float(np.mean(agreement)), k, pearson(curves[1], curves[0]), len(pairs))


def traced(model, facts: Sequence[Fact], config: TraceConfig, method: str) -> tuple[list[FactTrace], float]:
    """Every fact traced one at a time under ``config`` with ``method``, and the CPU seconds it took."""
    config = dataclasses.replace(config, method=method, show_progress=False)
    traces, started = [], time.process_time()
    for fact in tqdm(facts, desc=f"{method} traces", unit="fact", disable=not config.show_progress):
        traces.append(trace_fact(model, fact, config=config))
    return traces, time.process_time() - started


def atp_accuracy(model, facts: Sequence[Fact], config: TraceConfig = TraceConfig(), k: int = 10,
                 exact: tuple[list[FactTrace], float] | None = None) -> AtpAccuracy:
    """Trace every fact exactly and by AtP under ``config`` (its ``method`` is ignored) and compare them.
    ``exact``: the exact traces of ``facts`` and their seconds, already made (:func:`traced`), e.g. to
    compare several AtP settings with one exact run."""
    exact_traces, exact_seconds = exact if exact is not None else traced(model, facts, config, "exact")
    atp, atp_seconds = traced(model, facts, config, "atp")
    kinds = {kind: compare_traces(exact_traces, atp, kind, k) for kind in config.kinds}
    return AtpAccuracy(kinds, len(facts), exact_seconds, atp_seconds, config)
