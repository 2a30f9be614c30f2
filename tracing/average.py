"""Average indirect effect over many facts, and the choice of MEMIT's critical layers from it.

Follows kmeng01/rome's ``average_causal_effects`` notebook (ROME Fig. 2). Tokens are grouped into six
roles relative to the subject: its first token, its middle tokens, its last token, the first token after
it, further tokens, and the prompt's last token. Each role collects score rows (restored p(answer) per
layer): one row per fact for the single-token roles and one row *per token* for the middle and further
roles, so longer subjects weigh more there, as in ROME. Roles may overlap: a one-token subject is both
first and last subject token, and the token right after the subject may be the last token. The average
indirect effect (AIE) is the mean restored probability minus the mean corrupted probability.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from tracing.causal_trace import FactTrace, TraceConfig, trace_fact, trace_facts_scanned
from tracing.distributed import gather_shards, shard, world
from tracing.facts import Fact

TOKEN_ROLES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def token_roles(n_tokens: int, subject_range: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each role for a prompt of ``n_tokens`` with the subject at ``subject_range``.

    A subject that ends the prompt has no subsequent tokens (ROME's code never meets that case).
    """
    start, end = subject_range
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end <= last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


@dataclass
class AverageEffect:
    """Mean restored p(answer) per (token role, layer) over ``n_facts`` correctly predicted facts."""

    kind: str
    roles: tuple[str, ...]
    mean_scores: np.ndarray  # (n_roles, n_layers), NaN where no fact had the role
    counts: np.ndarray  # (n_roles,) score rows behind each role
    n_facts: int
    mean_clean_prob: float
    mean_corrupted_prob: float
    window: int = 10

    @property
    def effect(self) -> np.ndarray:
        """Average indirect effect: mean restored probability minus mean corrupted probability."""
        return self.mean_scores - self.mean_corrupted_prob

    @property
    def total_effect(self) -> float:
        return self.mean_clean_prob - self.mean_corrupted_prob

    def role(self, name: str) -> np.ndarray:
        """The AIE curve over layers for one token role."""
        return self.effect[self.roles.index(name)]


def average_indirect_effect(traces: Iterable[FactTrace], kind: str, only_correct: bool = True) -> AverageEffect:
    """Average ``kind``'s traces by token role; facts the model gets wrong are skipped (as ROME)."""
    kept = [t for t in traces if kind in t.scores and (t.correct or not only_correct)]
    if any(t.direction == "noising" for t in kept):
        raise ValueError("average indirect effects are defined on denoising traces (ROME's), not noising ones")
    if not kept:
        raise ValueError(f"no traces with kind {kind!r}" + (" that the model predicts correctly" if only_correct else ""))
    n_layers = kept[0].n_layers
    sums = np.zeros((len(TOKEN_ROLES), n_layers))
    counts = np.zeros(len(TOKEN_ROLES), dtype=int)
    for trace in kept:
        scores = trace.scores[kind]
        for r, positions in enumerate(token_roles(trace.n_tokens, trace.subject_range).values()):
            sums[r] += scores[positions].sum(axis=0)
            counts[r] += len(positions)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    return AverageEffect(
        kind=kind,
        roles=TOKEN_ROLES,
        mean_scores=mean,
        counts=counts,
        n_facts=len(kept),
        mean_clean_prob=float(np.mean([t.clean_prob for t in kept])),
        mean_corrupted_prob=float(np.mean([t.corrupted_prob for t in kept])),
        window=kept[0].window,
    )


def trace_facts(model, facts: Sequence[Fact], config: TraceConfig = TraceConfig()) -> list[FactTrace]:
    """Trace many facts (one progress bar over facts; per-fact bars are turned off).

    Under ``torch.distributed`` each rank traces its shard of the facts and every rank gets all traces
    back, in the order of ``facts``; each fact's noise depends on its own seed only, so the traces are
    the single-process ones."""
    quiet = replace(config, show_progress=False)
    show = config.show_progress and world().is_main
    mine = shard(facts)
    if config.method == "atp":  # the scan takes config.fact_batch facts per forward and backward
        local = []
        with tqdm(total=len(mine), desc="tracing facts", unit="fact", disable=not show) as bar:
            for start in range(0, len(mine), config.fact_batch):
                local += trace_facts_scanned(model, mine[start: start + config.fact_batch], quiet)
                bar.update(len(mine[start: start + config.fact_batch]))
    else:
        local = [trace_fact(model, fact, config=quiet)
                 for fact in tqdm(mine, desc="tracing facts", unit="fact", disable=not show)]
    return gather_shards(local)


@dataclass(frozen=True)
class CriticalLayers:
    """The MLP layers MEMIT edits, chosen from the AIE of MLP windows at the last subject token.

    ``single_layer_curve`` (set by :func:`tracing.locate.locate`, empty otherwise) is the AIE of restoring
    one MLP layer alone at the last subject token: where the windowed curve is flat it tells which layer
    carries the effect."""

    layers: tuple[int, ...]
    curve: tuple[float, ...]  # AIE of the MLP window centred on each layer, at the last subject token
    peak: int
    method: str
    n_facts: int
    single_layer_curve: tuple[float, ...] = ()


SELECTION_METHODS = ("peak-end", "max-sum")


def choose_critical_layers(effect: AverageEffect, size: int = 5, method: str = "peak-end") -> CriticalLayers:
    """Pick ``size`` consecutive MLP layers from the last-subject-token AIE curve.

    ``peak-end`` (default) takes the band ending at the curve's peak, the recipe behind MEMIT's choices
    (GPT-J 3-8, GPT-2 XL 13-17): the edit is spread over the MLPs leading up to where the effect is
    strongest. ``max-sum`` takes the band with the largest summed effect.
    """
    if effect.kind != "mlp":
        raise ValueError(f"critical layers are chosen from the MLP effect, got kind {effect.kind!r}")
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}")
    curve = effect.role("last subject token")
    if np.isnan(curve).all():
        raise ValueError("no fact contributed a last subject token")
    n_layers = len(curve)
    size = max(1, min(size, n_layers))
    values = np.nan_to_num(curve, nan=-np.inf)
    peak = int(np.argmax(values))
    if method == "peak-end":
        first = min(max(0, peak - size + 1), n_layers - size)
    else:
        sums = [values[i: i + size].sum() for i in range(n_layers - size + 1)]
        first = int(np.argmax(sums))
    return CriticalLayers(
        layers=tuple(range(first, first + size)),
        curve=tuple(float(v) for v in curve),
        peak=peak,
        method=method,
        n_facts=effect.n_facts,
    )
