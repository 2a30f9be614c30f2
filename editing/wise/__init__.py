"""WISE (Wang et al., NeurIPS 2024): lifelong editing in side memories behind a router.

MEMIT writes every edit into the model's weights, so hundreds of sequential edits interfere with each
other and with what the model knew. WISE leaves the weights alone and edits side copies of one MLP
down-projection; a router sends an input to a side memory only when that memory's activation on it is
large. Where this implementation differs from the paper and EasyEdit, and what each choice measured, is
in docs/wise.md.

``config`` (hyperparameters), ``easyedit`` (EasyEdit's algorithm as a preset), ``routing`` (scores and the
routing decision), ``subject_gate`` (``route_match="subject"``: only prompts spelling a memory's
subjects may reach it), ``memory`` (side memories, shards, merges), ``negatives`` and ``calibration``
(what the router is trained and calibrated against), ``editor`` (:class:`WiseEditor`: hooks, editing, persistence).
"""

from editing.ties import ties_merge
from editing.wise.calibration import FloorCalibrator
from editing.wise.config import WiseConfig, default_layer
from editing.wise.easyedit import WiseEasyEditConfig
from editing.wise.editor import EditResult, WiseEditor
from editing.wise.memory import SideMemory
from editing.wise.negatives import NegativeSampler, unrelated_texts
from editing.wise.relations import Relations
from editing.wise.routing import (Routing, activation_scores, calibrated_floors, common_directions, row_score,
                                  running_score)
from editing.wise.subject_gate import SubjectGate

__all__ = ["EditResult", "FloorCalibrator", "NegativeSampler", "Relations", "Routing", "SideMemory", "SubjectGate",
           "WiseConfig", "WiseEasyEditConfig", "WiseEditor", "activation_scores", "calibrated_floors",
           "common_directions", "default_layer", "row_score", "running_score", "ties_merge", "unrelated_texts"]
