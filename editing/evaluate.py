"""Evaluation of edits: CounterFact metrics, zsRE-style token accuracy, tables and plots.

CounterFact (as kmeng01/memit's ``eval_utils_counterfact`` + ``summarize``): every score compares the mean
per-token negative log-likelihood (NLL) of two continuations of the same prompt.

* Efficacy ES = P[NLL(true) > NLL(new)] on the rewrite prompt; magnitude EM = E[p(new) - p(true)] with
  p = exp(-mean NLL) (the geometric mean of token probabilities).
* Paraphrase PS / PM: the same on the paraphrase prompts (averaged per case, then over cases).
* Neighbourhood NS = P[NLL(answer) < NLL(new)] / NM = E[p(answer) - p(new)] on prompts about *other*
  subjects: CounterFact's neighbourhood prompts (answer = the edited fact's true target) and, where a
  record has them, ``locality`` pairs with their own answers (the bundled facts: other facts of the same
  relation), skipping pairs whose answer is the new target itself and prompts edited in the same batch.
* Score = harmonic mean of ES, PS and NS. Generation entropy GE = mean over generated texts of
  ``(2/3·H2 + 4/3·H3) / 2`` (bigram and trigram entropies in bits), from top-5 sampled continuations of
  the generation prompts; words are split with a regular expression (upstream uses NLTK's tokenizer,
  whose data cannot be downloaded offline).

Token accuracy (zsRE, and the lifelong metrics of WISE): the fraction of target tokens that are the
argmax prediction under teacher forcing. Locality there is agreement with the unedited model's argmax
tokens (EasyEdit's definition), recorded before the first edit, so it is 1.0 before any edit by
construction. Its prompts are each record's own locality set in its dataset's published format: zsRE's
``loc`` ("nq question: ...?") and the bundled facts' ``locality`` pairs, else CounterFact's neighbourhood
prompts (answered with the true target). A metric whose records carry no prompts for it raises
:class:`NoDataError`; it is never NaN. Under teacher forcing the unedited model already scores part of the
new targets, so tables (:func:`markdown_table`) always carry the unedited row.

Generated answers (greedy generation, no teacher forcing) are the third scoring,
:mod:`editing.generated_answers`; ``python -m editing.evaluate METHOD ...`` edits facts with a method and
writes all three side by side (:mod:`editing.evaluation_command`).

Targets follow one convention everywhere (:func:`tracing.tokens.target_token_ids`): ``" " + target.strip()``.
Batches are right-padded (:func:`tracing.tokens.right_padded`), which causal attention makes exact, so the
numbers do not depend on the batch size or on the tokenizer's ``padding_side``.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

if __name__ == "__main__":  # answer --help and refuse bad arguments before torch is imported
    from editing.cli import parse_evaluate_args

    parse_evaluate_args()

import numpy as np
import torch

from tracing.facts import Fact
from tracing.tokens import encode, right_padded, target_token_ids

METRICS = ("ES", "EM", "PS", "PM", "NS", "NM", "score")


@dataclass
class Continuation:
    """Teacher-forced reading of ``target`` after ``prompt``."""

    token_log_probs: list[float]
    predicted: list[int]  # argmax token at each target position
    target: list[int]

    @property
    def mean_nll(self) -> float:
        return -float(np.mean(self.token_log_probs))

    @property
    def probability(self) -> float:
        """Geometric mean of the target tokens' probabilities, exp(-mean NLL)."""
        return math.exp(-self.mean_nll)

    @property
    def accuracy(self) -> float:
        return float(np.mean([p == t for p, t in zip(self.predicted, self.target)]))


@torch.no_grad()
def read_continuations(model, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[Continuation]:
    """For each (prompt, target): log-probabilities and argmax predictions of the target tokens."""
    results: list[Continuation] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        encoded = [(encode(model, prompt), target_token_ids(model, target)) for prompt, target in chunk]
        tokens = right_padded(model, [p + t for p, t in encoded])
        logits = model(tokens)
        for row, (prompt_ids, target_ids) in enumerate(encoded):
            positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
            log_probs = torch.log_softmax(logits[row, positions].float(), -1)
            picked = log_probs[torch.arange(len(target_ids)), torch.tensor(target_ids)]
            results.append(Continuation(picked.tolist(), log_probs.argmax(-1).tolist(), list(target_ids)))
    return results


# --- CounterFact -----------------------------------------------------------------------------------------


def _first_token(model, text: str) -> int:
    return target_token_ids(model, text)[0]


def _neighbour_checks(model, fact: Fact, edited_prompts: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Prompts about other subjects and the answer they should keep. Prompts that are themselves edited
    in the same batch are left out (their answer is supposed to change), as are pairs whose answer is
    this case's new target (the comparison would be meaningless)."""
    checks = [(prompt, fact.target_true) for prompt in fact.neighborhood]
    new_first = _first_token(model, fact.target_new)
    checks += [(prompt, answer) for prompt, answer in fact.locality if _first_token(model, answer) != new_first]
    return [(prompt, answer) for prompt, answer in checks if prompt not in edited_prompts]


@dataclass
class CaseResult:
    """Per-case CounterFact comparisons: (NLL of the correct continuation, NLL of the other) pairs."""

    rewrite: tuple[float, float, float, float]  # nll_new, nll_true, p_new, p_true
    paraphrases: list[tuple[float, float, float, float]] = field(default_factory=list)
    neighbours: list[tuple[float, float, float, float]] = field(default_factory=list)  # nll_answer, nll_new, p..


@dataclass
class CounterFactSummary:
    n_cases: int
    ES: float
    EM: float
    PS: float
    PM: float
    NS: float
    NM: float
    score: float
    GE: float | None = None

    def as_dict(self) -> dict:
        return {"scoring": "probability", **asdict(self)}


def counterfact_cases(model, facts: Sequence[Fact], batch_size: int = 64,
                      edited: Iterable[Fact] = ()) -> list[CaseResult]:
    """Read every continuation CounterFact needs, in batches, and pair them up per case. Neighbour
    prompts edited among ``facts`` or ``edited`` (the whole run, when ``facts`` is one call of it) are
    left out."""
    pairs: list[tuple[str, str]] = []
    layout = []
    edited_prompts = frozenset(fact.prompt for fact in (*facts, *edited))
    for fact in facts:
        if fact.target_new is None:
            raise ValueError(f"fact {fact.subject!r} has no target_new to evaluate")
        prompts = [fact.prompt, *fact.paraphrases]
        neighbours = _neighbour_checks(model, fact, edited_prompts)
        start = len(pairs)
        for prompt in prompts:
            pairs += [(prompt, fact.target_new), (prompt, fact.target_true)]
        for prompt, answer in neighbours:
            pairs += [(prompt, answer), (prompt, fact.target_new)]
        layout.append((start, len(prompts), len(neighbours)))
    read = read_continuations(model, pairs, batch_size)

    def pair(i: int) -> tuple[float, float, float, float]:
        a, b = read[i], read[i + 1]
        return a.mean_nll, b.mean_nll, a.probability, b.probability

    cases = []
    for start, n_prompts, n_neighbours in layout:
        comparisons = [pair(start + 2 * k) for k in range(n_prompts)]
        neighbours = [pair(start + 2 * (n_prompts + k)) for k in range(n_neighbours)]
        cases.append(CaseResult(comparisons[0], comparisons[1:], neighbours))
    return cases


def summarize_counterfact(cases: Sequence[CaseResult], entropy: float | None = None) -> CounterFactSummary:
    """Mean over cases of success rates and magnitudes (per-case means first, as upstream)."""
    def success(comparisons):  # first continuation more likely than the second
        return float(np.mean([a < b for a, b, _, _ in comparisons]))

    def magnitude(comparisons):
        return float(np.mean([pa - pb for _, _, pa, pb in comparisons]))

    es = np.mean([success([c.rewrite]) for c in cases])
    em = np.mean([magnitude([c.rewrite]) for c in cases])
    with_para = [c for c in cases if c.paraphrases]
    ps = np.mean([success(c.paraphrases) for c in with_para]) if with_para else float("nan")
    pm = np.mean([magnitude(c.paraphrases) for c in with_para]) if with_para else float("nan")
    with_neigh = [c for c in cases if c.neighbours]
    ns = np.mean([success(c.neighbours) for c in with_neigh]) if with_neigh else float("nan")
    nm = np.mean([magnitude(c.neighbours) for c in with_neigh]) if with_neigh else float("nan")
    parts = [v for v in (es, ps, ns) if not math.isnan(v)]
    score = len(parts) / sum(1 / v for v in parts) if parts and min(parts) > 0 else 0.0
    return CounterFactSummary(len(cases), float(es), float(em), float(ps), float(pm), float(ns), float(nm),
                              float(score), entropy)


def ngram_entropy(text: str) -> float:
    """(2/3·H2 + 4/3·H3) / 2 of one text, in bits (MEMIT's fluency measure)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        entropies.append(weight * h)
    return float(np.mean(entropies))


def generation_entropy(model, facts: Sequence[Fact], max_new_tokens: int = 100, seed: int = 0) -> float:
    """Mean n-gram entropy of top-5 sampled continuations of the facts' generation prompts."""
    from editing.generate import sample_continuations

    prompts = [p for fact in facts for p in fact.generation_prompts] or [fact.prompt for fact in facts]
    texts = sample_continuations(model, prompts, max_new_tokens, top_k=5, seed=seed)
    return float(np.mean([ngram_entropy(t) for t in texts]))


def evaluate_counterfact(model, facts: Sequence[Fact], generation_cases: int = 0) -> CounterFactSummary:
    """CounterFact summary for ``facts``; ``generation_cases`` > 0 adds GE on that many cases."""
    entropy = generation_entropy(model, facts[:generation_cases]) if generation_cases else None
    return summarize_counterfact(counterfact_cases(model, facts), entropy)


# --- token accuracy (zsRE, lifelong editing) -------------------------------------------------------------


class NoDataError(ValueError):
    """A metric was asked of records that carry nothing to compute it from (named in the message)."""


@dataclass(frozen=True)
class AccuracySummary:
    """Rel./Gen./Loc.: the share of hits on edit prompts, on paraphrases, and of agreement with the
    unedited model on locality prompts, with how many prompts each read. ``scoring`` says what a hit is:
    ``token`` (target-token accuracy under teacher forcing, here) or ``generated`` (greedy generation
    starts with the target, :mod:`editing.generated_answers`). ``locality`` is None (and ``n_locality`` 0)
    only when every locality prompt of these facts is itself edited in the run, or (as ``generalization``)
    when the dataset has no such prompt and the metric was not required."""

    n_cases: int
    reliability: float
    generalization: float | None
    locality: float | None
    n_generalization: int = 0
    n_locality: int = 0
    scoring: str = "token"

    def as_dict(self) -> dict:
        return {"scoring": self.scoring, **{k: v for k, v in asdict(self).items() if k != "scoring"}}


def merge_accuracy(parts: Sequence[AccuracySummary]) -> AccuracySummary:
    """One summary of several calls' summaries, each metric weighted by the prompts it read: the same
    numbers as one pass over all their prompts (every metric is a mean over prompts)."""
    if not parts:
        raise NoDataError("no summaries to merge")
    scorings = {p.scoring for p in parts}
    if len(scorings) > 1:
        raise ValueError(f"cannot merge summaries of different scorings: {sorted(scorings)}")

    def mean(key: str, count: str) -> float | None:
        weights = [(getattr(p, count), getattr(p, key)) for p in parts if getattr(p, count)]
        total = sum(n for n, _ in weights)
        return sum(n * value for n, value in weights) / total if total else None

    return AccuracySummary(sum(p.n_cases for p in parts), mean("reliability", "n_cases"),
                           mean("generalization", "n_generalization"), mean("locality", "n_locality"),
                           sum(p.n_generalization for p in parts), sum(p.n_locality for p in parts),
                           scorings.pop())


@dataclass(frozen=True)
class Baseline:
    """The unedited model's argmax tokens on ``pairs``, recorded before the first edit: locality is
    agreement with these, never with a model that is already edited. Keeping the pairs lets
    :func:`agreement` refuse a baseline recorded on other prompts."""

    pairs: tuple[tuple[str, str], ...]
    predictions: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.predictions)


def fact_locality_pairs(fact: Fact) -> list[tuple[str, str]]:
    """One record's locality set in its dataset's own terms: its ``locality`` pairs where it has them
    (zsRE's ``loc``/``loc_ans``, the bundled facts' other facts of the relation), else its CounterFact
    neighbourhood prompts, whose answer is the edited fact's true target."""
    if fact.locality:
        return list(fact.locality)
    return [(prompt, fact.target_true) for prompt in fact.neighborhood]


def locality_pairs(facts: Sequence[Fact], edited: Iterable[Fact] = ()) -> list[tuple[str, str]]:
    """The facts' locality pairs (:func:`fact_locality_pairs`), leaving out prompts that are themselves
    edited among ``facts`` or ``edited`` (e.g. the whole run, when ``facts`` is one call of it): their answer
    is supposed to change, and in a long lifelong run most bundled locality facts get edited too."""
    edited = {fact.prompt for fact in (*facts, *edited)}
    return [(prompt, answer) for fact in facts for prompt, answer in fact_locality_pairs(fact)
            if prompt not in edited]


def argmax_predictions(model, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """The model's argmax tokens at each pair's target positions (teacher-forced)."""
    return [c.predicted for c in read_continuations(model, pairs)]


def agreement(model, pairs: Sequence[tuple[str, str]], baseline: Baseline | Sequence[Sequence[int]]) -> float:
    """Mean over ``pairs`` of the fraction of argmax tokens equal to ``baseline``'s. No pairs is an
    error, not NaN; a :class:`Baseline` recorded on other pairs is refused."""
    if not pairs:
        raise NoDataError("agreement over no prompts: nothing to compare with the unedited model")
    if isinstance(baseline, Baseline) and tuple(map(tuple, pairs)) != baseline.pairs:
        raise ValueError("the baseline was recorded on other prompts than these")
    predictions = baseline.predictions if isinstance(baseline, Baseline) else baseline
    now = argmax_predictions(model, pairs)
    if len(now) != len(predictions):
        raise ValueError("baseline does not match these prompts")
    per_pair = [np.mean([a == b for a, b in zip(tokens, base)]) for tokens, base in zip(now, predictions)]
    return float(np.mean(per_pair))


def locality_predictions(model, facts: Sequence[Fact], edited: Iterable[Fact] = ()) -> Baseline:
    """The model's argmax tokens on every locality pair: call before the first edit, pass to the
    evaluation (with the same ``edited``)."""
    pairs = tuple(locality_pairs(facts, edited))
    return Baseline(pairs, tuple(tuple(p) for p in argmax_predictions(model, pairs)))


def evaluate_accuracy(model, facts: Sequence[Fact], baseline: Baseline | Sequence[Sequence[int]],
                      edited: Iterable[Fact] = (),
                      required: Sequence[str] = ("generalization", "locality")) -> AccuracySummary:
    """Token accuracy of ``target_new`` on prompts and paraphrases; locality vs ``baseline``, the unedited
    model's predictions (:func:`locality_predictions`; see :func:`locality_pairs` for ``edited``).

    Records that carry no paraphrase, or no locality or neighbourhood prompt, raise :class:`NoDataError`
    instead of reporting NaN. A metric left out of ``required`` (a dataset that has none of its prompts,
    e.g. MQuAKE: the caller shows no column for it) is None with a count of 0 instead."""
    edited = tuple(edited)
    if not facts:
        raise NoDataError("no facts to evaluate")
    para = [(p, f.target_new) for f in facts for p in f.paraphrases]
    if not para and "generalization" in required:
        raise NoDataError("generalization: none of these facts has a paraphrase prompt")
    if not any(fact_locality_pairs(f) for f in facts) and "locality" in required:
        raise NoDataError("locality: none of these facts has a locality or neighbourhood prompt")
    rel = read_continuations(model, [(f.prompt, f.target_new) for f in facts])
    gen = read_continuations(model, para)
    loc = locality_pairs(facts, edited)
    return AccuracySummary(
        n_cases=len(facts),
        reliability=float(np.mean([c.accuracy for c in rel])),
        generalization=float(np.mean([c.accuracy for c in gen])) if gen else None,
        locality=agreement(model, loc, baseline) if loc else None,
        n_generalization=len(para),
        n_locality=len(loc),
    )


# --- presentation ----------------------------------------------------------------------------------------


def markdown_table(rows: dict[str, dict], columns: Sequence[str], plain: Sequence[str] = (),
                   unedited: str = "unedited", corner: str = "") -> str:
    """A Markdown table with one row per entry, the ``unedited`` row (the model before any edit) first.
    Float values are shown as percentages, except in the ``plain`` columns (quantities that are not
    fractions, such as seconds or entropies). ``corner`` heads the row names (e.g. the protocol and
    scoring the table shows).

    The unedited row is required: under teacher forcing the unedited model already gets part of the new
    targets' tokens right (0.11-0.14 on zsRE: later tokens of a multi-token answer follow from the first),
    so an edited row cannot be read without it."""
    if unedited not in rows:
        raise ValueError(f"a table of edits needs the {unedited!r} row beside the edited ones; got {list(rows)}")
    rows = {unedited: rows[unedited], **rows}
    def cell(value, column: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.1f}" if column in plain else f"{100 * value:.1f}"
        return str(value)

    head = f"| {corner} | " if corner else "| | "
    lines = [head + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(values.get(c), c) for c in columns) + " |"
              for name, values in rows.items()]
    return "\n".join(lines)


def plot_metrics_vs_edits(results: dict[int, dict], metrics: Sequence[str], baseline: dict | None = None,
                          title: str = "MEMIT on the embedded model"):
    """Line plot of metrics against the number of edits (log x axis), unedited values dashed."""
    import matplotlib.pyplot as plt

    from tracing.plot import STYLE

    counts = sorted(results)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        for i, metric in enumerate(metrics):
            color = f"C{i}"
            ax.plot(counts, [results[n][metric] for n in counts], marker="o", color=color, label=metric)
            if baseline is not None and baseline.get(metric) is not None:
                ax.axhline(baseline[metric], color=color, linestyle="--", linewidth=0.8, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xticks(counts)
        ax.set_xticklabels([str(n) for n in counts])
        ax.set_xlabel("number of facts edited at once")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8, ncol=len(metrics))
        fig.tight_layout()
    return fig


if __name__ == "__main__":  # python -m editing.evaluate METHOD --dataset NAME -n N [--sequential --batch B] ...
    from editing.evaluation_command import main

    sys.exit(main())
