"""The ``wise-easyedit`` preset: WISE as EasyEdit runs it, as a reference row next to ours.

EasyEdit's hyperparameters (``hparams/WISE/llama-7b.yaml``) and its algorithm where it differs from our
defaults, every piece a field of :class:`WiseConfig`: the mean activation gap over the tokens, the 5 / 20 / 10
margins averaged over their violated entries, the threshold 0.88 x the smallest edit gap and nothing else,
the largest gap wins, SGD weight decay 1e-5, no replay, and none of our negatives, calibration floors or
common directions. What it still does differently from EasyEdit is listed in docs/wise.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editing.wise.config import WiseConfig


@dataclass(frozen=True)
class WiseEasyEditConfig(WiseConfig):
    """EasyEdit's WISE. ``layer`` None is :func:`editing.side_layer.default_layer`: EasyEdit's layer 27 of 32
    on LLaMA-2-7B scaled to the model (round(0.84 x layers): 25 of SmolLM2's 30)."""

    method: ClassVar[str] = "wise-easyedit"

    n_iter: int = 70
    edit_lr: float = 1.0
    mask_ratio: float = 0.2
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    norm_constraint: float = 1.0
    save_freq: int = 500
    merge_freq: int = 1000
    density: float = 0.53
    retrieve: bool = True
    replay: int = 0
    stop_loss: float = 0.02
    stop_change: float = 1e-4
    weight_decay: float = 1e-5
    score: str = "mean"  # the mean gap over the tokens, not the running maximum
    score_positions: str = "target"  # edits' gaps read prompt and answer, as EasyEdit's rows hold both
    choose: str = "score"  # of the memories above threshold, the largest gap
    margin_mean: str = "violated"
    context_prefixes: tuple[str, ...] = ("I", "You", "Because", "Yes", "Q:")
    bare_contexts: bool = False
    corrupted_samples: int = 0
    negatives: int = 0
    negatives_per_edit: int = 0
    calibration: int = 0  # no threshold floor: the threshold is act_ratio x the smallest edit gap
    subject_negatives: int = 0
    relation_negatives: int = 0
    subject_prefix: bool = False
    common_directions: int = 0
    route_match: str = "any"  # no subject gate: every prompt may reach every memory
