"""The ``wise-easyedit`` preset: WISE as EasyEdit runs it, as a reference row next to ours.

EasyEdit's hyperparameters (``hparams/WISE/llama-7b.yaml``) and its algorithm: the mean activation gap over
the tokens, the 5 / 20 / 10 margins averaged over their violated entries, the threshold 0.88 x the smallest
edit gap and nothing else, the largest gap wins, SGD weight decay 1e-5, no replay, and none of our
negatives, calibration floors or common directions. :class:`WiseConfig`'s defaults are all of that already
(EasyEdit's training behind our subject gate); the preset takes the gate away and puts back EasyEdit's
shard sizes. Tests hold every EasyEdit value in both. What it still does differently from EasyEdit is
listed in docs/wise.md.
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

    save_freq: int = 500
    merge_freq: int = 1000
    route_match: str = "any"  # no subject gate: every prompt may reach every memory
