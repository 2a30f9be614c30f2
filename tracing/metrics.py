"""What a trace reads off the last position: p(answer) (ROME) or a logit difference against a counterfactual.

Probability is ROME's score; it saturates (a restored state that moves the logit a lot may barely move a
probability near 0 or 1). The logit difference ``logit(answer) - logit(counterfactual)`` is linear in the
final residual stream up to the final norm, and is what activation-patching work since Wang et al. (2022)
reports beside or instead of probability.
"""

from __future__ import annotations

import torch

METRICS = ("prob", "logit_diff")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def answer_metric(logits_last: torch.Tensor, answer_id: int, counterfactual_id: int | None = None) -> torch.Tensor:
    """Per row of (rows, vocab) last-position logits: p(answer), or logit(answer) - logit(counterfactual)
    when ``counterfactual_id`` is given. Computed in float32 whatever the model's dtype."""
    logits = logits_last.float()
    if counterfactual_id is None:
        return torch.softmax(logits, dim=-1)[:, answer_id]
    return logits[:, answer_id] - logits[:, counterfactual_id]


def metric_label(metric: str, answer: str, counterfactual: str | None) -> str:
    """How a figure names the metric, e.g. ``p(Paris)`` or ``logit(Paris) − logit(Rome)``."""
    if metric == "logit_diff":
        return f"logit({answer.strip()}) − logit({(counterfactual or '?').strip()})"
    return f"p({answer.strip()})"


def atp_space_label(space: str | None, metric: str) -> str:
    """What an AtP estimate was linear in, for titles and logs: ``log-odds`` where ``space="log_odds"``
    and the metric is a probability, else ``the metric`` (plain AtP, logit_diff, or a trace saved before
    the choice existed, whose ``atp_space`` is None)."""
    return "log-odds" if space == "log_odds" and metric == "prob" else "the metric"
