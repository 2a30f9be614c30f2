"""WISE (Wang et al., NeurIPS 2024): lifelong editing in a side memory, behind a router.

MEMIT writes every edit into the model's own weights, so after hundreds of sequential edits the edits
interfere with each other and with what the model knew. WISE leaves the main memory untouched and edits a
*side memory*: a copy of one MLP down-projection ``W`` (the value matrix of a mid-to-late layer). A router
decides, per input, whether that layer's output comes from the main memory or from a side memory.

* **Activation score.** For a down-projection input (key) ``x``, the score of side memory ``W'`` is
  ``||x (W' - W)ᵀ||₂``: how far the side memory moves the layer's output (the paper's Δ_act; here ``x``
  without its common directions, see below). We store only
  ``Δ = W' - W``; the side output is ``main output + x Δᵀ``, so a bias, where the layer has one, is
  shared. (EasyEdit applies the activation function to the two outputs before the difference; we follow
  the paper.)
* **Routing loss.** While editing, the score of in-scope rows (the edit prompt in a few contexts) is pushed
  above ``beta``, that of unrelated text below ``alpha``, and their gap above ``gamma``:
  ``ReLU(s_out - alpha) + ReLU(beta - s_in) + ReLU(s_out - s_in + gamma)``, added to the cross-entropy of
  the new target.
* **Threshold.** A memory's threshold is ``act_ratio`` x the smallest in-scope score recorded at the end of
  its edits (the paper's), raised where needed to a floor calibrated on held-out prompts (below); an input
  scoring above it is routed to that memory.
* **Knowledge shards.** Each shard (``save_freq`` edits) trains only a random ``mask_ratio`` fraction of the
  entries of Δ (a new random mask per shard), so shards mostly touch different parameters and can be
  merged with TIES (:func:`ties_merge`) every ``merge_freq`` edits.
* **WISE-Retrieve** (``retrieve=True``) keeps merged shards as separate memories, each with its own
  threshold, and routes to the one with the largest score above its threshold. **WISE-Merge**
  (``retrieve=False``) folds every merge into one memory and uses one global threshold.

Choices of this implementation, and why they differ from EasyEdit (each measured when it was made):

* **Causal routing on the running maximum.** The decision at position ``t`` uses the largest per-token
  score among positions ``<= t`` (``score="max"``; ``"mean"`` uses their mean). EasyEdit averages over the
  whole input, padding included, with batch size 1, and takes the maximum for inputs longer than 100
  tokens. Being causal, a position's output never depends on later tokens or on padding: right-padded
  batches give exactly the per-prompt results, and teacher-forced evaluation routes the position that
  predicts the answer on the prompt alone. Left padding and key/value-cached generation are handled by
  reading the attention mask and cache length from the call into the Hugging Face model and carrying the
  running statistic across calls. On SmolLM2 (10 sequential known facts of different relations, whose
  locality prompts are other facts of the same relation; n_iter 40) the maximum routed 10 % of those
  neighbours to the side memory, the mean 74 %: Rel/Gen/Loc 0.95/0.55/0.97 against 1.00/0.75/0.75.
* **Unrelated rows.** Each edit is contrasted with model-written text (``loc_prefixes``), with the bare
  context prefixes (so the score must come from the prompt, not its context) and with copies of the edit
  prompt whose subject embeddings are drowned in noise (ROME's corruption: the relation without its
  subject), never with the locality prompts an evaluation uses. The corrupted copies keep other subjects
  of the same relation out of the side memory: on SmolLM2 (3 edits of different relations) Loc is 0.72
  without them, 0.82 with 4 and 1.00 with 16. They do not suffice once several edits share a relation:
  the memory then answers to the relation itself (10 random known facts, 3 of one relation: 36 % of the
  neighbours routed, Loc 0.86). The layer's input does not depend on the side memory, so these rows cost
  one forward up to the layer per edit and one matrix product per step.
* **Fact-shaped negatives.** The rows above are unlike the prompts that locality is measured on, which
  are facts about other subjects. Each edit call therefore also trains against ``negatives_per_edit``
  prompts drawn from ``negatives`` fact prompts about subjects nobody edits (by default the bundled
  :func:`tracing.facts.unused_fact_prompts`: candidate facts SmolLM2 does not know, none of them read by
  any evaluation of the bundled facts; EasyEdit gives NQ questions of a training split this role), none
  naming a subject of the call. Measured on SmolLM2, 100 known facts in calls of 10 (``n_iter`` 30,
  ``edit_lr`` 2), fraction of prompts routed to the side memory, edited / paraphrases / their locality
  prompts / held-out known facts: 0.89 / 0.73 / 0.66 / 0.58 without them, 0.72 / 0.62 / 0.40 / 0.33 with 64
  per call. The router partly memorises them: negatives it trained on are routed 0-6 % of the time,
  unknown-fact prompts it never saw 17 %.
* **Calibrated threshold floor.** Margins alone do not separate the edits from other facts on this model
  (in that run, bare edit prompts score 102 at the median, the held-out facts 76 with a long tail to
  115 at p90), and the paper's threshold (0.88 x the weakest edit) sits below most of both. So each memory
  also gets a floor: the ``calibration_quantile`` of its scores on ``calibration`` further fact prompts that
  it is never trained on and that no edit is meant to answer, recomputed after every edit and merge. With
  the default quantile 1.0 (the largest such score) the same run routes 0.10 / 0.085 / 0.006 / 0.015;
  quantile 0.99 gives 0.16 / 0.19 / 0.024 / 0.03. It trades reliability for locality, openly: an edit whose
  prompt scores below what unrelated facts reach is left unanswered rather than answering for them. A
  calibration prompt that asks about an edited subject in another relation (told from ``templates``) counts
  (``calibration_scope="fact"``); ``"subject"`` leaves out every prompt naming an edited subject, as before.
* **Joint calibration over many memories** (``calibration_mode="joint"``). Under WISE-Retrieve a prompt is
  routed if it passes *any* memory's threshold, so per-memory floors (``"memory"``) let one calibration
  tail through per memory. The joint floor is ``c`` x each memory's scale (the median score of its edits),
  with one ``c``: the quantile, over the calibration prompts, of their largest score-to-scale ratio over
  all memories. The quantile then bounds the routed share of such prompts for all memories together; with
  one memory both modes agree. Of several memories above their thresholds the router picks the one furthest
  above, as a ratio (EasyEdit: the largest raw score).
* **Small shards.** One side memory for many edits is not specific: at T = 200 in calls of 10 facts, one
  shard holding all 200 (``n_iter`` 30, ``edit_lr`` 2) scores its own edit prompts 108 at the median and
  the locality prompts (other known facts of the same relations) 93, and routes 2.5 % of the edits above
  its floor (Rel/Gen/Loc/held-out 0.053/0.049/0.998/0.995). With ``save_freq=10`` (a shard, and under
  Retrieve a memory, per call; no merges) and the joint floor, without the negatives of the next item:
  17.5 % routed, 0.163/0.115/0.995/0.975.
  Note that the unedited model already reaches Rel/Gen 0.041/0.044 on these new targets (teacher-forced
  tokens after the first), so a memory that routes nothing scores about that.
* **Subject and relation negatives, subject prefixes.** Each fact of an edit call also trains against
  ``subject_negatives`` prompts asking about its subject in *other* relations and ``relation_negatives``
  prompts asking its relation about *other* subjects (both from ``templates`` / ``subjects``, the bundled
  candidates' by default; never a prompt an evaluation or the calibration reads, never a subject a
  calibration prompt names), and, with ``subject_prefix``, against its own rows cut after the subject, so
  that neither the subject alone nor the relation alone is routed. They make the memories stricter, not
  better separated: same 200-edit run with small shards, 5.5 % routed, 0.085/0.063/1.000/1.000 (subject
  negatives alone: 5.0 %, 0.091/0.084/0.998/0.995); with one shard for all they change nothing measurable
  (0.051-0.063 / 0.047 / 0.998 / 0.99-0.995).
* **Scores where routing decides.** The routing margins, the replayed scores and the recorded in-scope
  scores read the position that predicts the first target token (the prompt alone,
  ``score_positions="prompt"``), not the teacher-forced target positions too (``"target"``), whose running
  maximum includes the new target's own tokens and so overstated what a bare prompt scores. Same run, with
  the floor: 0.10 / 0.085 routed edits / paraphrases against 0.08 / 0.065, locality unchanged.
* **Common directions.** Keys of all inputs share a few large directions (the first, close to the mean
  key, carries 24 % of generic text's key energy at SmolLM2's layer 25). A side memory that reads them
  changes the output of every input alike, which the margins must then fight: the loss oscillates and
  unrelated inputs score like edits. So the side memories read keys without their components along the
  top ``common_directions`` eigenvectors of E[k kᵀ] over the unrelated texts (fixed at attach, saved with
  the memories): the side output is ``main output + (P x) Δᵀ`` with P that projection, and the score is
  ``||(P x) Δᵀ||``. Δ then comes out orthogonal to those directions. One call editing 10 facts on SmolLM2
  (n_iter 40): loss 131 (oscillating) -> 5.8 (smooth); edited prompts routed 8 -> 10 of 10, held-out
  known facts 8 -> 2 of 10 (10 vs 10 facts of the same relations). It is a trade: 10 single sequential
  edits give Rel/Gen/Loc/held-out 0.80/0.60/0.90/0.91 with it and 0.95/0.78/0.88/0.85 with
  ``common_directions=0`` (a larger ``edit_lr`` of 2 does not win reliability back: 0.70/0.45/0.84/0.92).
  The directions are now 32, fitted on the generic text at every position and on the negatives' last
  tokens (fact prompts): that lowers the median cosine between a locality prompt's last-token key and
  its nearest edit's from 0.67 (8 from generic text) to 0.35, but routing in the run above barely moved
  (0.08 / 0.065 / 0.006 / 0.015 routed with 32, 0.08 / 0.065 / 0.004 / 0.005 with 64).
* **Speed.** Everything below the side-memory layer is fixed while editing: one forward records each row's
  keys, its residual stream after the layer and the arguments of the later blocks; each step adds
  ``x Δᵀ`` and replays only the later blocks, then unembeds only the target positions.
* **Optimiser.** SGD on Δ at EasyEdit's constant rate, the shard's mask on the gradient, Δ clamped to
  ``±norm_constraint``, no weight decay. At rate 1 the margin terms make it oscillate (period 2) rather
  than converge; a decaying rate converges (loss 130 -> 0.2 instead of 50-100) but the smaller edits are
  overwritten by later ones: 10 sequential edits gave Rel 0.65 against 0.95 at the constant rate.
* **Replay** (the paper's appendix option, off in EasyEdit, on here): each edit also keeps the routing
  scores of up to ``replay`` earlier edits of the shard above the shard's recorded minimum, so that later
  edits do not push earlier ones under the threshold (score terms only, no cross-entropy: cheap). 10
  edits: Rel/Gen/Loc 0.95/0.78/0.88 with it, 0.95/0.68/0.86 without.
* **Margins** are in units of the activation score, which scale with the model; see :class:`WiseConfig`.

Known limitation, measured on SmolLM2: the activation score of one linear side memory does not separate
many edits from other facts of the same relations. With 3 sequential edits of different relations
(capital of Germany -> Jerusalem, currency of the UK -> lira, opposite of hot -> wet) the negatives and
the floor suffice: Rel/Gen 1.00/1.00, the 15 bundled neighbours (other subjects of the same relations)
score 12-76 against a threshold of 85 and none is routed (Loc 1.00; before: 10 of 15 routed, "The
capital of Hungary is" -> Jerusalem, Loc 0.49). At scale the floor chooses locality over reliability.

At scale (``benchmarks/lifelong.py``, 1 thread; see the README for the tables): 100 single edits in one
shard give Rel/Gen/Loc/held-out 0.05/0.05/1.00/0.99 (before the negatives and the floor 0.11/0.09/0.96/0.94;
sequential MEMIT 0.94/0.74/0.78/0.76). It is not forgetting: at T = 200 in one shard the edits' scores
show no trend with their age (median 92-118 in every block of 20 edits), they are simply not above what
other facts score.
At T = 1000 in calls of 10 facts (``n_iter`` 30, ``edit_lr`` 2), the merged memory of two 500-edit shards
gives 0.04/0.04/0.98/0.97 (before: 0.12/0.10/0.34/0.33; sequential MEMIT has collapsed, 0.03/0.02/0.00/0.01).
Note that the unedited model already reaches Rel/Gen 0.037/0.036 on those 1000 new targets (teacher-forced
tokens after the first), so the merged memory above answered almost no edit. Smaller memories answer
more (see *Small shards*). With a memory per call (``save_freq=10``, no merges: 100 memories) and the
defaults otherwise: 0.089/0.070/0.996/0.995, 6 % of the edit prompts routed, 0.4 % of the locality prompts.
Without the subject/relation negatives and prefix rows the same run routes 1.2 % (0.047/0.039/1.00/1.00),
likely because memories that fire on their subjects alone lift the joint floor through calibration prompts about edited
subjects in other relations, so at scale those negatives raise reliability rather than cost it.

The main model never changes: :meth:`WiseEditor.detach` removes the hooks and the model's outputs are bit
for bit those of the unedited model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from editing.contexts import context_templates
from editing.prompts import in_context, right_padded, subject_row
from editing.requests import validate_requests
from editing.targets import frozen_weights
from editing.weights import weight_fingerprint
from tracing.adapter import ModelAdapter
from tracing.blocks import logits_of
from tracing.engine import require_full_forwards
from tracing.facts import (SLOT, Fact, encode_fact, evaluated_prompts, relation_subjects, relation_templates,
                           unused_fact_prompts)
from tracing.io import load_tensors, save_tensors_atomic
from tracing.models import model_spec
from tracing.state import state_of, text_cache
from tracing.noise import default_noise_std, sample_noise
from tracing.tokens import encode, target_token_ids

FINAL_NORM_INPUT = "ln_final.hook_in"
LAYER_FRACTION = 0.84  # LLaMA-2-7B: layer 27 of 32 in the paper and EasyEdit
SCORES = ("max", "mean")
SCORE_POSITIONS = ("prompt", "target")
CALIBRATION_SCOPES = ("fact", "subject")
CALIBRATION_MODES = ("joint", "memory")
LOC_PREFIXES = ("In", "We", "It", "My", "This", "When", "There", "She", "He", "They", "A", "After", "For", "If",
                "On", "One", "Our", "Today", "What", "How", "Why", "Yesterday", "Please", "Thanks", "Water",
                "Music", "Science", "Python", "Dear", "Once", "Most", "Every")


def default_layer(n_layers: int) -> int:
    """The side-memory layer by default: ``round(0.84 * n_layers)``, the paper's LLaMA choice (27 of 32;
    25 of 30 for SmolLM2). The paper's layer ablation favours mid-to-late layers."""
    return min(n_layers - 1, round(LAYER_FRACTION * n_layers))


@dataclass(frozen=True)
class WiseConfig:
    """WISE hyperparameters: EasyEdit's LLaMA-2-7B values except the margins, ``replay`` and the options of
    this implementation's unrelated rows. Measurements below: SmolLM2-135M, the first bundle of 456 facts.

    ``alpha`` / ``beta`` / ``gamma`` are norms of changes to the side layer's d_model output, so they scale
    with the model. EasyEdit's 5 / 20 / 10 are for 7B models. On SmolLM2-135M's layer 25 the MLP output
    has median norm 80 (p90 100) on fact prompts; after edits, unrelated text scores 60-90 and edit
    prompts 150-300 under the running-max score, so ``beta`` = 20 never binds and ``alpha`` = 5 acts as a
    plain linear penalty. We scale the margins by 4 (20 / 80 / 40), which puts ``beta`` at the level of
    unrelated text (10 edits, Rel/Gen/Loc 0.95/0.55/0.97 against 0.95/0.57/0.93 with 5 / 20 / 10). On other
    models, measure the scores (:meth:`WiseEditor.route`, :class:`EditResult`) and scale accordingly.

    ``calibration_quantile`` sets how strict the threshold floor is: 1.0 keeps every calibration prompt on
    the main memory; 0.99 lets the top 1 % through and answers more edits (see the module docstring).
    """

    layer: int | None = None  # None: default_layer(n_layers)
    n_iter: int = 70
    edit_lr: float = 1.0
    mask_ratio: float = 0.2  # ρ: fraction of Δ's entries a shard trains
    alpha: float = 20.0  # unrelated inputs score below this
    beta: float = 80.0  # edit inputs score above this
    gamma: float = 40.0  # and at least this much above unrelated ones
    act_ratio: float = 0.88  # threshold = act_ratio x smallest in-scope score
    norm_constraint: float = 1.0  # |Δ| <= this, elementwise
    save_freq: int = 500  # edits per knowledge shard
    merge_freq: int = 1000  # edits between TIES merges (a multiple of save_freq)
    density: float = 0.53  # TIES: fraction of each shard's entries kept
    retrieve: bool = True  # WISE-Retrieve (True) or WISE-Merge (False)
    score: str = "max"  # routing statistic over the positions so far: "max" or "mean"
    score_positions: str = "prompt"  # margins and thresholds read the prompt's last token, or all "target" ones
    stop_loss: float = 0.02  # stop early once the loss is this low ...
    stop_change: float = 1e-4  # ... and changed less than this since the previous step
    context_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # tokens of each generated context, prefix included
    loc_prefixes: tuple[str, ...] = LOC_PREFIXES  # one model-written unrelated text per prefix
    loc_length: int = 16
    replay: int = 16  # earlier edits of the shard whose scores each edit keeps up (0: none, EasyEdit's default)
    corrupted_samples: int = 16  # noisy-subject copies of each edit prompt among the unrelated rows
    negatives: int = 256  # fact-shaped prompts about other subjects kept at attach (0: none)
    negatives_per_edit: int = 64  # of which each edit call trains against this many, drawn anew
    calibration: int = 256  # further such prompts, never trained on, that set each memory's threshold floor
    calibration_quantile: float = 1.0  # the floor: this quantile of a memory's scores on them
    calibration_mode: str = "joint"  # one floor scale for all memories ("joint") or each its own ("memory")
    subject_negatives: int = 8  # per edited fact: prompts about its subject in other relations (0: none)
    relation_negatives: int = 8  # per edited fact: its relation's templates about other, unedited subjects
    subject_prefix: bool = True  # each edit row up to its subject's last token is an unrelated row
    calibration_scope: str = "fact"  # calibration leaves out prompts of edited facts, or of edited "subject"s
    common_directions: int = 32  # top directions of generic keys the side memories ignore (0: none)
    noise_multiplier: float = 3.0  # their noise, in subject-embedding stds (ROME's 3)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.save_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError("merge_freq must be a positive multiple of save_freq")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.density <= 1 or not 0 < self.act_ratio <= 1:
            raise ValueError("mask_ratio, density and act_ratio must be in (0, 1]")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {self.score!r}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, not {self.calibration_mode!r}")
        if self.calibration_scope not in CALIBRATION_SCOPES:
            raise ValueError(f"calibration_scope must be one of {CALIBRATION_SCOPES}, not {self.calibration_scope!r}")
        if self.score_positions not in SCORE_POSITIONS:
            raise ValueError(f"score_positions must be one of {SCORE_POSITIONS}, not {self.score_positions!r}")

    def resolved_layer(self, n_layers: int) -> int:
        layer = default_layer(n_layers) if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
        return layer


# --- TIES merging ------------------------------------------------------------------------------------------


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merge task vectors (Yadav et al. 2023): trim, elect a sign, take the disjoint mean.

    Each delta keeps its ``density`` fraction of largest-magnitude entries. Per entry, the sign of the
    weighted sum of the trimmed deltas is elected (0 counts as +); the result is the weighted mean over the
    deltas whose entry is non-zero with the elected sign, and 0 where there is none.
    """
    trimmed = torch.stack([_keep_largest(d, density) for d in deltas])
    w = torch.tensor(list(weights), dtype=trimmed.dtype, device=trimmed.device).view(-1, *[1] * (trimmed.ndim - 1))
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = torch.sign(trimmed) == elected
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * delta.numel())
    kept = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    kept[delta.abs().flatten().topk(k).indices] = True
    return delta * kept.view_as(delta)


# --- routing statistics -----------------------------------------------------------------------------------


def running_score(scores: torch.Tensor, valid: torch.Tensor | None, kind: str,
                  carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing statistic at every position: max or mean of the per-token ``scores`` (..., b, s) over
    the valid positions so far. ``carry`` continues rows whose earlier positions were in a previous call
    (a KV-cached prefix); the second result is the carry for the next call."""
    weights = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    if kind == "max":  # scores are norms (>= 0), so a padded position's 0 never wins
        running = (scores * weights).cummax(-1).values
        if carry is not None:
            running = torch.maximum(running, carry[0][..., None])
        return running, running[..., -1][None]
    sums = (scores * weights).cumsum(-1)
    counts = weights.cumsum(-1).expand_as(sums)
    if carry is not None:
        sums, counts = sums + carry[0][..., None], counts + carry[1][..., None]
    return sums / counts.clamp(min=1.0), torch.stack([sums[..., -1], counts[..., -1]])


def row_score(scores: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """The routing statistic at the end of each right-padded row (its last valid position)."""
    if kind == "max":
        return (scores * valid).max(-1).values
    return _masked_mean(scores, valid)


def common_directions(keys: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors of the uncentred second moment E[k kᵀ] of ``keys`` (N, d_mlp), as
    columns (d_mlp, count). The first is close to the mean key: on SmolLM2's layer 25 it carries 24 % of
    generic text's key energy, and the keys of different fact prompts have mean cosine 0.35 with it and
    0.19 without it."""
    if count == 0:
        return keys.new_zeros(keys.shape[-1], 0)
    moment = keys.T.double() @ keys.double() / len(keys)
    _, vectors = torch.linalg.eigh(moment)
    return vectors[:, -count:].flip(1).to(keys.dtype).contiguous()


def activation_scores(keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-token activation score ``||x Δᵀ||`` for keys (..., d_mlp) and Δ (d_model, d_mlp)."""
    return torch.linalg.vector_norm(keys @ delta.T, dim=-1)


# --- training on a fixed prefix of the network ----------------------------------------------------------


@dataclass
class RecordedRows:
    """What an optimisation of one layer's MLP output needs from a single forward of its rows."""

    keys: torch.Tensor  # (R, S, d_mlp) down-projection inputs, float32
    outputs: torch.Tensor  # (R, S, d_model) down-projection outputs
    hidden: torch.Tensor  # (R, S, d_model) residual stream after the layer, in the model's dtype
    calls: list[tuple[tuple, dict]]  # recorded arguments of the blocks after the layer


def record_rows(model, tokens: torch.Tensor, layer: int) -> RecordedRows:
    """One forward of right-padded ``tokens`` recording, at ``layer``, the down-projection's input and
    output and the residual stream after it, plus the arguments every later block received, so that an
    optimisation of that layer's output reruns only the later blocks (:func:`replay_later_blocks`)."""
    adapter = ModelAdapter.of(model)
    later = range(layer + 1, adapter.n_layers)
    calls: dict[int, tuple[tuple, dict]] = {}
    captured: dict[str, torch.Tensor] = {}

    def record(module, args, kwargs, block: int) -> None:
        calls[block] = (args, dict(kwargs))

    def keep(value: torch.Tensor, hook) -> None:
        captured[hook.name] = value.detach()

    def stop(value: torch.Tensor, hook) -> None:
        raise StopAtLayerException(value)  # the unembedding is not needed

    handles = [model.blocks[j].register_forward_pre_hook(functools.partial(record, block=j), with_kwargs=True)
               for j in later]
    try:  # no KV cache: the recorded calls must not append to one when replayed
        model.run_with_hooks(tokens, use_cache=False, fwd_hooks=[
            (adapter.mlp_key(layer), keep), (adapter.mlp_value(layer), keep), (adapter.resid_out(layer), keep),
            (FINAL_NORM_INPUT, stop)])
    finally:
        for handle in handles:
            handle.remove()
    return RecordedRows(captured[adapter.mlp_key(layer)].float(), captured[adapter.mlp_value(layer)],
                        captured[adapter.resid_out(layer)], [calls[j] for j in later])


def add_permanent_hooks(model, hooks: Sequence[tuple[str, Callable]]) -> list:
    """Add forward hooks that survive ``model.reset_hooks()`` and run before any other hook at their
    points; returns handles for :func:`remove_hooks`, which removes exactly these."""
    points = model.hook_dict
    return [(points[name], points[name].add_hook(fn, is_permanent=True, prepend=True)) for name, fn in hooks]


def remove_hooks(handles: list) -> None:
    for hook_point, handle in handles:
        handle.hook.remove()
        hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not handle]


def replay_later_blocks(model, layer: int, calls: list[tuple[tuple, dict]], hidden: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the final norm, from ``hidden`` after ``layer``: the later blocks
    replayed with their recorded arguments (apply :func:`tracing.blocks.logits_of` for logits)."""
    for block, (args, kwargs) in enumerate(calls, start=layer + 1):
        out = model.blocks[block](hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


# --- state ------------------------------------------------------------------------------------------------


@dataclass
class SideMemory:
    """One side memory: Δ = W_side - W_main as (d_model, d_mlp), and the scores it was edited to."""

    delta: torch.Tensor
    min_act: float = math.inf  # smallest in-scope score recorded at the end of an edit (inf: none yet)
    n_edits: int = 0
    floor: float = 0.0  # threshold floor calibrated on prompts it was never trained on
    in_scores: list[float] = field(default_factory=list)  # per edit: its in-scope score when it was made
    calibration_scores: torch.Tensor | None = field(default=None, repr=False, compare=False)  # cache

    @property
    def scale(self) -> float:
        """The typical score of its edits (their median): what the joint calibration divides by."""
        if self.in_scores:
            return float(torch.tensor(self.in_scores).median())
        return self.min_act if math.isfinite(self.min_act) else 1.0


@dataclass
class Routing:
    """Where one prompt is routed: each memory's score at the prompt's last token, the thresholds, and the
    chosen memory (an index into :attr:`WiseEditor.memories`; None = the main memory)."""

    prompt: str
    scores: list[float]
    thresholds: list[float]
    memory: int | None


@dataclass
class EditResult:
    """How one call of :meth:`WiseEditor.edit` went."""

    n_facts: int
    steps: int
    loss: float
    in_scores: list[float]  # per fact: mean in-scope score over its rows at the end
    out_score: float  # largest score over the unrelated rows at the end
    seconds: float
    memory_sizes: list[int] = field(default_factory=list)  # edits per memory after this call


@dataclass
class _Batch:
    """The fixed part of one edit's training rows, computed once with the main memory."""

    keys: torch.Tensor  # (R, S, d_mlp) down-projection inputs, float32
    hidden: torch.Tensor  # (R, S, d_model) residual stream after the side layer, in the model's dtype
    valid: torch.Tensor  # (R, S) real tokens
    decision: torch.Tensor  # (R, S) positions that predict a target token
    fact: torch.Tensor  # (R,) which request a row belongs to
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    target_tokens: torch.Tensor
    target_weights: torch.Tensor  # 1 / (tokens of the row's target x rows per fact)
    calls: list[tuple[tuple, dict]]  # recorded arguments of the blocks after the side layer
    unrelated_keys: torch.Tensor  # (J, S', d_mlp)
    unrelated_valid: torch.Tensor  # (J, S')
    replay_keys: torch.Tensor  # (P, S'', d_mlp): bare rows of earlier edits in this shard
    replay_valid: torch.Tensor
    replay_decision: torch.Tensor


@dataclass
class _Call:
    """What the routing hook needs from the current call into the model: padding mask, cache length."""

    mask: torch.Tensor | None
    past: int


@torch.no_grad()
def unrelated_texts(model, prefixes: Sequence[str], length: int, seed: int) -> list[str]:
    """One short model-written text per prefix (top-5 sampling). Cached on the model object, like MEMIT's
    context templates: they depend only on the model and the seed, and sampling is the slow part of
    :meth:`WiseEditor.attach`."""
    from editing.generate import sample_continuations

    cache = text_cache(model, "unrelated_texts")
    key = (tuple(prefixes), length, seed)
    if key not in cache:
        cache[key] = sample_continuations(model, list(prefixes), length, top_k=5, seed=seed)
    return list(cache[key])


# --- the editor -------------------------------------------------------------------------------------------


# Relative headroom of a floor over the scores it keeps out: a few float32 ulps, so that the same prompt
# scored again in another batch shape (or with another machine's kernels) still stays below it.
FLOOR_HEADROOM = 4 * torch.finfo(torch.float32).eps


def calibrated_floors(scores: torch.Tensor, scales: Sequence[float], quantile: float, mode: str) -> list[float]:
    """Each memory's threshold floor from its scores (M, N) on N calibration prompts.

    ``"memory"``: the ``quantile`` of each memory's own scores. ``"joint"``: one factor ``c`` for all, the
    quantile over the prompts of their largest score-to-scale ratio, times each memory's scale. A prompt at
    or below the quantile must stay out on any machine, and routing is ``score > threshold``, so a floor is
    never below the largest score it is meant to keep out (``c x scale`` alone can round a hair under the
    top prompt's own score), and it carries :data:`FLOOR_HEADROOM` on top.
    """
    if mode == "memory":
        floors = [float(torch.quantile(row, quantile)) for row in scores]
    else:
        ratios = scores / torch.tensor(scales, dtype=scores.dtype).clamp(min=1e-6)[:, None]
        ratio = torch.quantile(ratios.max(0).values, quantile)
        kept_out = ratios.max(0).values <= ratio  # the prompts this quantile keeps off every memory
        floors = [max(float(ratio) * max(scale, 1e-6), float(row[kept_out].max()) if kept_out.any() else 0.0)
                  for row, scale in zip(scores, scales)]
    return [floor * (1 + FLOOR_HEADROOM) for floor in floors]


class WiseEditor:
    """WISE side memories for one model, routed through TransformerBridge hooks.

    >>> editor = WiseEditor(WiseConfig()).attach(model)
    >>> editor.edit(fact)                    # a fact (or a small list) with target_new; edits accumulate
    >>> editor.route(["The Eiffel Tower is located in"])   # which memory a prompt would use, and why
    >>> editor.save("wise.safetensors")
    >>> editor.detach()                      # the model is exactly the unedited one again
    """

    def __init__(self, config: WiseConfig = WiseConfig(), negatives: Sequence[str] | None = None,
                 calibration: Sequence[str] | None = None,
                 templates: Mapping[str, Sequence[str]] | None = None,
                 subjects: Mapping[str, Sequence[str]] | None = None) -> None:
        """``negatives``: fact-shaped prompts about subjects that will not be edited, which the router is
        trained to leave on the main memory; ``calibration``: more such prompts, never trained on, whose
        scores floor each memory's threshold. None: ``config.negatives`` / ``config.calibration`` disjoint
        draws from the bundled :func:`tracing.facts.unused_fact_prompts`, which no evaluation of the
        bundled facts reads. ``templates``: per relation id, prompt templates (``{}`` for the subject) from
        which each edit's subject negatives are built, in the relations other than its own (None: the
        bundled :func:`tracing.facts.relation_templates`); ``subjects``: per relation id, subjects whose
        prompts in that relation are the relation negatives of its edits (None: the bundled candidates')."""
        self.config = config
        self.templates = {r: tuple(t) for r, t in (relation_templates() if templates is None else templates).items()}
        self.subjects = {r: tuple(t) for r, t in (relation_subjects() if subjects is None else subjects).items()}
        self.negative_prompts: list[str] | None = None if negatives is None else list(negatives)
        self.calibration_prompts: list[str] | None = None if calibration is None else list(calibration)
        self.model = None
        self.layer: int | None = None
        self.model_name: str | None = None
        self.base_fingerprint: str | None = None  # of the main down-projection the memories belong to
        self.stored: list[SideMemory] = []  # finished shards / merged memories
        self.current: SideMemory | None = None  # the shard being edited
        self.mask: torch.Tensor | None = None  # its trainable entries
        self.merged = False  # WISE-Merge: stored[0] is the merged memory
        self.saved_shards = 0
        self.global_min_act = math.inf
        self.n_edits = 0
        self.requests: list[Fact] = []
        self._hook_handles: list = []  # (hook point, LensHandle) of the routing hooks
        self._call_handles: list = []  # pre/post hooks on the Hugging Face model
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # stacked deltas, thresholds
        self._key: torch.Tensor | None = None
        self._call: _Call | None = None
        self._carry: torch.Tensor | None = None
        self._routing_on = True
        self._contexts: list[str] = []
        self._unrelated: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid
        self._negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid of negative_prompts
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid of calibration_prompts
        self._reserved: set[str] = set()  # prompts never trained on: evaluations' and the calibration's
        self._parsed: dict[str, tuple[str, str] | None] = {}  # prompt -> (subject, relation), see _parse
        self.common: torch.Tensor | None = None  # (d_mlp, r) orthonormal directions shared by generic keys

    # --- inspection ---------------------------------------------------------------------------------
    @property
    def memories(self) -> list[SideMemory]:
        """The memories the router chooses from: the stored ones (in WISE-Merge, the merged memory and the
        shards waiting for the next merge), then the current shard once it holds an edit."""
        current = [self.current] if self.current is not None and self.current.n_edits else []
        return self.stored + current

    def thresholds(self) -> list[float]:
        """Per memory: inputs scoring above this are routed to it."""
        ratio = self.config.act_ratio
        if self.config.retrieve:
            return [max(m.min_act * ratio, m.floor) for m in self.memories]
        return [max(self.global_min_act * ratio, m.floor) for m in self.memories]

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> list[Routing]:
        """Scores and routing decision at the last token of each prompt, exactly as the hook decides."""
        model = self._attached()
        if not self.memories:
            return [Routing(p, [], [], None) for p in prompts]
        rows = [encode(model, p) for p in prompts]
        keys = self._keys(model, rows)
        statistic, choice, _, _ = self._decide(keys, _valid_mask(rows, keys.device), None)
        index, last = torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])
        scores, chosen = statistic[:, index, last], choice[index, last]
        return [Routing(p, scores[:, i].tolist(), self.thresholds(), int(chosen[i]) if chosen[i] >= 0 else None)
                for i, p in enumerate(prompts)]

    # --- attach / detach ----------------------------------------------------------------------------
    def attach(self, model) -> "WiseEditor":
        """Install the routing hooks on ``model``; its weights are never changed."""
        if self.model is not None:
            raise RuntimeError("this editor is already attached; detach it first")
        if state_of(model).attached.get("wise") is not None:
            raise RuntimeError("another WiseEditor is attached to this model; detach it first")
        adapter = ModelAdapter.of(model)
        layer = self.config.resolved_layer(adapter.n_layers)
        if self.layer is not None and layer != self.layer:
            raise ValueError(f"these memories belong to layer {self.layer}, the config says {layer}")
        weight = adapter.down_projection(model, layer)
        fingerprint = weight_fingerprint(weight)
        if self.base_fingerprint is not None and fingerprint != self.base_fingerprint:
            raise ValueError(f"the layer-{layer} down-projection differs from the one these memories were made "
                             f"for (on {self.model_name!r})")
        self.layer, self.base_fingerprint, self.model_name = layer, fingerprint, model_spec(model).name
        if self.current is None:
            self._start_shard((adapter.d_model, adapter.d_mlp))
        self._move_to(weight.device)
        self._prepare_rows(model)  # samples text, so before any routing hook is in place
        self._install(model)
        return self

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it computed before :meth:`attach`."""
        model = self._attached()
        remove_hooks(self._hook_handles)
        for handle in self._call_handles:
            handle.remove()
        self._hook_handles, self._call_handles = [], []
        state_of(model).attached.pop("wise", None)
        require_full_forwards(model, "wise", False)
        self.model, self._call, self._carry, self._key = None, None, None, None

    def _install(self, model) -> None:
        """Permanent hooks (they survive ``model.reset_hooks()``), first in line at their hook points."""
        self._hook_handles = add_permanent_hooks(model, [(ModelAdapter.mlp_key(self.layer), self._keep_key),
                                                         (ModelAdapter.mlp_value(self.layer), self._route_output)])
        hf_model = model.original_model
        self._call_handles = [hf_model.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                              hf_model.register_forward_hook(self._end_call)]
        state_of(model).attached["wise"] = self
        require_full_forwards(model, "wise", True)  # routing reads the whole prefix: no suffix-only tracing
        self.model, self._table, self._carry = model, None, None

    def _attached(self):
        if self.model is None:
            raise RuntimeError("attach the editor to a model first")
        return self.model

    # --- hooks --------------------------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs) -> None:
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self._call = _Call(mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None, past)

    def _end_call(self, module, args, output) -> None:
        self._call = None

    def _keep_key(self, key: torch.Tensor, hook) -> None:
        self._key = key

    def _route_output(self, value: torch.Tensor, hook) -> torch.Tensor | None:
        key, self._key = self._key, None
        if not self._routing_on or key is None or not self.memories:
            return None
        key = self._specific(key)
        call = self._call or _Call(None, 0)
        fits = self._carry is not None and tuple(self._carry.shape[1:]) == (len(self.memories), key.shape[0])
        carry = self._carry if call.past > 0 and fits else None
        _, choice, change, self._carry = self._decide(key, _real_positions(call, key), carry)
        chosen = change.gather(0, choice.clamp(min=0)[None, ..., None].expand(1, *change.shape[1:]))[0]
        return torch.where((choice >= 0)[..., None], value + chosen.to(value.dtype), value)

    def _decide(self, keys: torch.Tensor, valid: torch.Tensor | None, carry: torch.Tensor | None):
        """Per memory: the output change and the running statistic; per position: the chosen memory
        (of the memories above their thresholds, the one furthest above, as a ratio; -1 = main memory)."""
        deltas, thresholds = self._routing_table()
        change = torch.einsum("bsm,kdm->kbsd", keys.to(deltas.dtype), deltas)
        statistic, carry = running_score(torch.linalg.vector_norm(change, dim=-1), valid, self.config.score, carry)
        eligible = statistic > thresholds[:, None, None]
        margin = statistic / thresholds.clamp(min=1e-6)[:, None, None]  # how far above its own threshold
        best = margin.masked_fill(~eligible, -math.inf).argmax(0)
        return statistic, torch.where(eligible.any(0), best, torch.full_like(best, -1)), change, carry

    def _routing_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None:
            deltas = torch.stack([m.delta for m in self.memories])
            self._table = deltas, torch.tensor(self.thresholds(), dtype=deltas.dtype, device=deltas.device)
        return self._table

    # --- editing ------------------------------------------------------------------------------------
    def edit(self, facts: Fact | Iterable[Fact], show_progress: bool = False) -> EditResult:
        """Write one fact (or a small batch, edited together) into the current side memory."""
        model = self._attached()
        facts = validate_requests(model, [facts] if isinstance(facts, Fact) else facts)
        start = time.perf_counter()
        self._routing_on = False  # rows are recorded with the main memory; training adds Δ itself
        try:
            with frozen_weights(model):
                batch = self._batch(model, facts)
                steps, loss = self._train(model, batch, show_progress)
                in_scores, out_score = self._final_scores(batch)
        finally:
            self._routing_on = True
        self._record(facts, in_scores)
        return EditResult(len(facts), steps, loss, in_scores, out_score, time.perf_counter() - start,
                          [m.n_edits for m in self.memories])

    def _record(self, facts: list[Fact], in_scores: list[float]) -> None:
        self.current.min_act = min(self.current.min_act, *in_scores)
        self.global_min_act = min(self.global_min_act, *in_scores)
        self.current.n_edits += len(facts)
        self.current.in_scores += in_scores
        self.n_edits += len(facts)
        self.requests += facts
        if self.current.n_edits >= self.config.save_freq:
            self._save_shard()
        self._refresh_floors()
        self._table, self._carry = None, None

    def _start_shard(self, shape: tuple[int, ...]) -> None:
        """A fresh side memory (Δ = 0: a copy of the main memory) and a new random mask of trainable
        entries, drawn from the config's seed and the number of edits so far (reproducible, new per shard)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.n_edits)
        self.mask = torch.rand(shape, generator=generator) < self.config.mask_ratio
        self.current = SideMemory(torch.zeros(shape))

    def _save_shard(self) -> None:
        device = self.current.delta.device
        self.stored.append(self.current)
        self.saved_shards += 1
        self._start_shard(tuple(self.current.delta.shape))
        self._move_to(device)
        per_merge = self.config.merge_freq // self.config.save_freq
        if self.saved_shards % per_merge == 0:
            self._merge(per_merge)

    def _merge(self, per_merge: int) -> None:
        """Retrieve: TIES the last shards into one memory. Merge: TIES everything into the one memory, the
        previous merge weighing 0.6 and the new shards sharing 0.4 (EasyEdit's weights)."""
        density = self.config.density
        if self.config.retrieve:
            group = self.stored[-per_merge:]
            self.stored[-per_merge:] = [_merged(group, [1.0 / len(group)] * len(group), density)]
            return
        if self.merged:
            group = self.stored[1:] + self.stored[:1]
            weights = [0.4 / (len(group) - 1)] * (len(group) - 1) + [0.6]
        else:
            group, weights = list(self.stored), [1.0 / len(self.stored)] * len(self.stored)
        self.stored = [_merged(group, weights, density)]
        self.merged = True

    # --- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch(self, model, facts: list[Fact]) -> _Batch:
        """Training rows: each request's prompt in every context template followed by its target (teacher
        forcing), recorded once with the main memory, and the unrelated rows."""
        rows, decisions, targets, owners, prefixes = [], [], [], [], []
        for f, fact in enumerate(facts):
            target = target_token_ids(model, fact.target_new)
            for context in self._contexts:
                prompt = subject_row(model, in_context(context, fact.template), fact.subject)
                rows.append(list(prompt.ids) + target[:-1])
                decisions.append(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
                targets.append(target)
                owners.append(f)
                prefixes.append(min(prompt.lookup + 1, len(prompt) - 1))
        recorded = record_rows(model, right_padded(model, rows), self.layer)
        keys, device = self._specific(recorded.keys), recorded.keys.device
        decision = torch.zeros(keys.shape[:2], dtype=torch.bool, device=device)
        spec = []
        for r, (positions, target) in enumerate(zip(decisions, targets)):
            decision[r, list(positions)[: self._scored_positions(len(positions))]] = True
            spec += [(r, p, t, 1.0 / len(target) / len(self._contexts)) for p, t in zip(positions, target)]
        target_rows, target_positions, target_tokens, target_weights = zip(*spec)
        long = functools.partial(torch.tensor, dtype=torch.long, device=device)
        groups = [self._unrelated, self._corrupted_subjects(model, facts), self._negative_rows(facts),
                  self._fact_negative_rows(model, facts)]
        if self.config.subject_prefix:  # the subject alone (and what precedes it) must not route
            width = keys.shape[1]
            groups.append((keys, torch.arange(width, device=device)[None, :] < torch.tensor(prefixes, device=device)[:, None]))
        unrelated = _stack_padded(groups)
        return _Batch(keys, recorded.hidden, _valid_mask(rows, device), decision, long(owners), long(target_rows),
                      long(target_positions), long(target_tokens), torch.tensor(target_weights, device=device),
                      recorded.calls, *unrelated, *self._replay_rows(model))

    @torch.no_grad()
    def _replay_rows(self, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys of up to ``replay`` earlier edits of the current shard (bare prompt + target), whose
        routing scores the new edit must not push below the shard's recorded minimum."""
        earlier = self.requests[len(self.requests) - self.current.n_edits:]
        chosen = random.Random(self.config.seed + self.n_edits).sample(earlier, min(self.config.replay, len(earlier)))
        rows, decisions = [], []
        for fact in chosen:
            prompt, target = encode(model, fact.prompt), target_token_ids(model, fact.target_new)
            rows.append(prompt + target[:-1])
            decisions.append((len(prompt) - 1, len(prompt) - 1 + len(target)))
        if not rows:
            empty = self._unrelated[0][:0]
            return empty, empty[..., 0].bool(), empty[..., 0].bool()
        keys = self._keys(model, rows)
        decision = torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
        for r, (start, end) in enumerate(decisions):
            decision[r, start: start + self._scored_positions(end - start)] = True
        return keys, _valid_mask(rows, keys.device), decision

    def _train(self, model, batch: _Batch, show_progress: bool) -> tuple[int, float]:
        config = self.config
        delta = self.current.delta.clone().requires_grad_(True)
        mask = self.mask.to(delta.dtype)
        previous, value, step = math.inf, math.inf, 0
        for step in range(config.n_iter):
            parts = self._loss(model, batch, delta)
            loss = sum(parts.values())
            value = float(loss.detach())
            if show_progress:
                terms = ", ".join(f"{name} {float(term.detach()):.3f}" for name, term in parts.items())
                print(f"step {step:3d} loss {value:.3f} ({terms})")
            if value <= config.stop_loss and abs(previous - value) <= config.stop_change:
                break
            previous = value
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta.sub_(config.edit_lr * grad * mask)
                delta.clamp_(-config.norm_constraint, config.norm_constraint)
        self.current.delta = delta.detach()
        self.current.calibration_scores = None
        return step + 1, value

    def _loss(self, model, batch: _Batch, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the new targets plus the three routing margins, every row through Δ. The edit
        rows' terms are averaged over each fact's contexts and summed over the facts of the call, so a fact
        edited in a batch learns as fast as one edited alone (with the mean over a batch of 10, one call
        of 40 steps left the new targets' NLL at 3.0 per fact; summed, 0.19 after 25 steps)."""
        config = self.config
        change = batch.keys @ delta.T
        final = replay_later_blocks(model, self.layer, batch.calls, batch.hidden + change.to(batch.hidden.dtype))
        logits = logits_of(model, final[batch.target_rows, batch.target_positions])
        nll = -torch.log_softmax(logits.float(), -1).gather(1, batch.target_tokens[:, None])[:, 0]
        in_rows = self._in_scores(torch.linalg.vector_norm(change, dim=-1), batch.valid, batch.decision)  # (R,)
        out_rows = row_score(activation_scores(batch.unrelated_keys, delta), batch.unrelated_valid, config.score)
        return {
            "nll": (nll * batch.target_weights).sum(),
            "below_alpha": torch.relu(out_rows - config.alpha).mean(),
            "above_beta": torch.relu(config.beta - in_rows).sum() / len(self._contexts),
            "gap": torch.relu(out_rows[None, :] - in_rows[:, None] + config.gamma).mean(1).sum() / len(self._contexts),
            "replay": self._replay_loss(batch, delta),
        }

    def _replay_loss(self, batch: _Batch, delta: torch.Tensor) -> torch.Tensor:
        """ReLU(min_act - score) over the replayed earlier edits: keeps them above the shard's threshold."""
        if not len(batch.replay_keys) or not math.isfinite(self.current.min_act):
            return torch.zeros((), device=delta.device)
        scores = self._in_scores(activation_scores(batch.replay_keys, delta), batch.replay_valid, batch.replay_decision)
        return torch.relu(self.current.min_act - scores).mean()

    def _scored_positions(self, n_targets: int) -> int:
        """How many of a row's target-predicting positions the routing margins and thresholds read: only the
        first (the prompt alone, ``score_positions="prompt"``) or all of them (``"target"``)."""
        return 1 if self.config.score_positions == "prompt" else n_targets

    def _in_scores(self, scores: torch.Tensor, valid: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        """Per row: the routing statistic averaged over the positions that predict the target."""
        statistic, _ = running_score(scores, valid, self.config.score)
        return _masked_mean(statistic, decision)

    @torch.no_grad()
    def _final_scores(self, batch: _Batch) -> tuple[list[float], float]:
        """Per request, the mean in-scope score over its rows (thresholds are learned from it), and the
        largest score over the unrelated rows."""
        delta = self.current.delta
        in_rows = self._in_scores(activation_scores(batch.keys, delta), batch.valid, batch.decision)
        per_fact = [float(in_rows[batch.fact == f].mean()) for f in range(int(batch.fact.max()) + 1)]
        out = row_score(activation_scores(batch.unrelated_keys, delta), batch.unrelated_valid, self.config.score)
        return per_fact, float(out.max())

    # --- context templates and unrelated rows ---------------------------------------------------------
    @torch.no_grad()
    def _prepare_rows(self, model) -> None:
        """MEMIT's context templates for the edit rows; model-written text and the bare contexts as the
        unrelated rows every edit shares."""
        config = self.config
        groups = context_templates(model, config.context_prefixes, config.context_length, config.seed)
        self._contexts = [context for group in groups for context in group]
        texts = unrelated_texts(model, config.loc_prefixes, config.loc_length, config.seed)
        texts += [c.replace(SLOT, "").strip() for c in self._contexts if c != SLOT]
        keys, valid = self._prompt_keys(model, texts)
        if self.negative_prompts is None or self.calibration_prompts is None:  # disjoint draws from one pool
            pool = unused_fact_prompts()
            random.Random(config.seed).shuffle(pool)
            if self.negative_prompts is None:
                self.negative_prompts = pool[: config.negatives]
            if self.calibration_prompts is None:
                taken = set(self.negative_prompts)
                pool = [prompt for prompt in pool if prompt not in taken]
                self.calibration_prompts = pool[: config.calibration]
        negatives = self._prompt_keys(model, self.negative_prompts)
        if self.common is None:  # a loaded editor brings its own
            last = negatives[0][torch.arange(len(negatives[1])), negatives[1].sum(1) - 1].to(keys.device)
            self.common = common_directions(torch.cat([keys[valid], last]), config.common_directions)
        self.common = self.common.to(keys.device)
        self._unrelated = self._specific(keys), valid
        self._negatives = self._specific(negatives[0]), negatives[1]
        calibration = self._prompt_keys(model, self.calibration_prompts)
        self._calibration = self._specific(calibration[0]), calibration[1]
        self._reserved = evaluated_prompts() | set(self.calibration_prompts)

    def _prompt_keys(self, model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and valid mask of ``prompts`` (an empty pair for none)."""
        rows = [encode(model, prompt) for prompt in prompts]
        if not rows:
            d_mlp = ModelAdapter.of(model).d_mlp
            return torch.zeros(0, 1, d_mlp), torch.zeros(0, 1, dtype=torch.bool)
        keys = self._keys(model, rows, specific=False)
        return keys, _valid_mask(rows, keys.device)

    def _negative_rows(self, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """``negatives_per_edit`` negative prompts, drawn anew for each call, none naming a subject of it."""
        allowed = _naming_none(self.negative_prompts, {fact.subject for fact in facts})
        rng = random.Random(self.config.seed * 7919 + self.n_edits)
        chosen = rng.sample(allowed, min(self.config.negatives_per_edit, len(allowed)))
        keys, valid = self._negatives
        device = self._unrelated[0].device
        return keys[chosen].to(device), valid[chosen].to(device)

    @torch.no_grad()
    def _fact_negative_rows(self, model, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of the subject negatives and relation negatives of ``facts``: the side memory must answer to
        the fact, not to its subject or its relation alone."""
        prompts = self._subject_negative_prompts(facts) + self._relation_negative_prompts(facts)
        if not prompts:
            return self._unrelated[0][:0], self._unrelated[1][:0]
        rows = [encode(model, prompt) for prompt in prompts]
        keys = self._keys(model, rows)
        return keys, _valid_mask(rows, keys.device)

    def _subject_negative_prompts(self, facts: list[Fact]) -> list[str]:
        """``subject_negatives`` prompts per fact that ask about its subject in another relation (from
        ``templates``), drawn anew for each call. Left out: the relations edited for that subject so far,
        and every prompt that an evaluation of the bundled facts, of the edited facts, or the calibration
        reads."""
        def options(fact: Fact, edited: set[tuple[str, str | None]]) -> set[str]:
            return {template.replace(SLOT, fact.subject) for relation, templates in self.templates.items()
                    if (fact.subject, relation) not in edited for template in templates}

        return self._draw_negatives(facts, self.config.subject_negatives, 104_729, options)

    def _relation_negative_prompts(self, facts: list[Fact]) -> list[str]:
        """``relation_negatives`` prompts per fact that ask its relation's question (any of its templates)
        about another subject: the side memory must answer to the subject too, not to the relation alone.
        Left out: subjects edited in that relation, subjects any calibration prompt names (the floor must
        stay an unbiased sample), and every prompt an evaluation or the calibration reads."""
        calibrated = {parsed[0] for parsed in map(self._parse, self.calibration_prompts or []) if parsed}

        def options(fact: Fact, edited: set[tuple[str, str | None]]) -> set[str]:
            relation = self._relation_of(fact)
            return {template.replace(SLOT, subject) for subject in self.subjects.get(relation, ())
                    if (subject, relation) not in edited and subject not in calibrated
                    for template in self.templates.get(relation, ())}

        return self._draw_negatives(facts, self.config.relation_negatives, 130_363, options)

    def _draw_negatives(self, facts: list[Fact], count: int, salt: int,
                        options: Callable[[Fact, set[tuple[str, str | None]]], set[str]]) -> list[str]:
        """``count`` of ``options(fact, edited)`` per fact, reproducibly drawn per call, none of them a
        prompt that an evaluation of the bundled facts, of the edited facts, or the calibration reads.
        ``edited`` holds the (subject, relation) pairs edited so far, this call's included."""
        if not count:
            return []
        everything = [*self.requests, *facts]
        edited = {(fact.subject, self._relation_of(fact)) for fact in everything}
        reserved = self._reserved | {prompt for fact in everything for prompt in fact.prompts_read}
        rng = random.Random(self.config.seed * salt + self.n_edits)
        prompts = []
        for fact in facts:
            choices = sorted(options(fact, edited) - reserved)
            prompts += rng.sample(choices, min(count, len(choices)))
        return prompts

    def _out_of_scope(self, prompts: Sequence[str], facts: Sequence[Fact]) -> list[int]:
        """Indices of the prompts that no fact's edit is meant to answer. ``calibration_scope="subject"``
        leaves out every prompt naming an edited subject; ``"fact"`` keeps those that ask about an edited
        subject in another relation (by ``templates``; a prompt whose relation cannot be told is left out)."""
        subjects = {fact.subject for fact in facts}
        if self.config.calibration_scope == "subject":
            return _naming_none(prompts, subjects)
        edited = {(fact.subject, self._relation_of(fact)) for fact in facts}
        kept = []
        for i, prompt in enumerate(prompts):
            named = [subject for subject in subjects if subject in prompt]
            parsed = self._parse(prompt) if named else None
            if not named or (parsed is not None and parsed not in edited and named == [parsed[0]]):
                kept.append(i)
        return kept

    def _parse(self, prompt: str) -> tuple[str, str] | None:
        """(subject, relation id) of a prompt that fills one of ``templates``; None if none fits."""
        cache = self._parsed
        if prompt not in cache:
            fits = []
            for relation, templates in self.templates.items():
                for template in templates:
                    head, tail = template.split(SLOT)
                    if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
                        fits.append((len(head) + len(tail), prompt[len(head): len(prompt) - len(tail)], relation))
            cache[prompt] = max(fits)[1:] if fits else None
        return cache[prompt]

    def _relation_of(self, fact: Fact) -> str | None:
        """The fact's relation id, or that of the relation whose templates include its template."""
        if fact.relation in self.templates:
            return fact.relation
        return next((r for r, templates in self.templates.items() if fact.template in templates), fact.relation)

    @torch.no_grad()
    def _refresh_floors(self) -> None:
        """Set every memory's threshold floor from its scores on the calibration prompts (fact-shaped
        prompts it was never trained on) outside every edit's scope, so that such prompts are seldom
        routed. ``calibration_mode="memory"``: each memory's floor is the ``calibration_quantile`` of its
        own scores. ``"joint"``: with many memories, a prompt is routed if it passes *any* floor, so
        per-memory floors let through up to one calibration tail per memory. Instead each floor is
        ``c`` x the memory's :attr:`SideMemory.scale`, one ``c`` for all: the quantile over the prompts
        of their largest score-to-scale ratio over the memories. The quantile then bounds the routed
        share of calibration prompts for all the memories together (with one memory the two agree)."""
        memories = self.memories
        kept = self._out_of_scope(self.calibration_prompts or [], self.requests)
        if not memories or not kept:
            for memory in memories:
                memory.floor = 0.0
            return
        index = torch.tensor(kept)
        scores = torch.stack([self._calibration_scores(memory)[index] for memory in memories])  # (M, N)
        for memory, floor in zip(memories, calibrated_floors(scores, [m.scale for m in memories],
                                                             self.config.calibration_quantile,
                                                             self.config.calibration_mode)):
            memory.floor = floor

    def _calibration_scores(self, memory: SideMemory) -> torch.Tensor:
        """The memory's score on every calibration prompt (cached until its Δ changes), on the CPU."""
        if memory.calibration_scores is None:
            keys, valid = (t.to(memory.delta.device) for t in self._calibration)
            scores = row_score(activation_scores(keys, memory.delta), valid, self.config.score)
            memory.calibration_scores = scores.float().cpu()
        return memory.calibration_scores

    @torch.no_grad()
    def _corrupted_subjects(self, model, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of each edit prompt with its subject's embeddings drowned in Gaussian noise: the relation
        without a recognisable subject, which the side memory must not answer to."""
        samples = self.config.corrupted_samples
        rows, spans = [], []
        for fact in facts:
            encoded, span = encode_fact(model, fact)
            rows += [list(encoded.ids)] * samples
            spans += [span] * samples
        if not rows:
            return self._unrelated[0][:0], self._unrelated[1][:0]
        width = max(len(r) for r in rows)
        std = default_noise_std(model, self.config.noise_multiplier)
        noise = sample_noise(len(rows), width, ModelAdapter.of(model).d_model, std, self.config.seed + self.n_edits)
        on_subject = torch.zeros(len(rows), width, 1)
        for r, (start, end) in enumerate(spans):
            on_subject[r, start:end] = 1.0
        noise = noise * on_subject

        def corrupt(embeddings: torch.Tensor, hook) -> torch.Tensor:
            return embeddings + noise.to(embeddings.device, embeddings.dtype)

        keys = self._keys(model, rows, [(ModelAdapter.embed, corrupt)])
        return keys, _valid_mask(rows, keys.device)

    @torch.no_grad()
    def _keys(self, model, rows: list[list[int]], hooks=(), specific: bool = True) -> torch.Tensor:
        """Down-projection inputs at the side layer, (rows, longest row, d_mlp), right-padded; with
        ``specific``, without their components along :attr:`common`."""
        captured = {}

        def keep(value: torch.Tensor, hook) -> None:
            captured["keys"] = value.detach().float()

        model.run_with_hooks(right_padded(model, rows), stop_at_layer=self.layer + 1,
                             fwd_hooks=[*hooks, (ModelAdapter.mlp_key(self.layer), keep)])
        return self._specific(captured["keys"]) if specific else captured["keys"]

    def _specific(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys without their components along the directions every input shares: the side memories
        read only this part, so they cannot respond to what all prompts have in common."""
        if self.common is None or not self.common.shape[1]:
            return keys
        basis = self.common.to(keys.device, keys.dtype)
        return keys - (keys @ basis) @ basis.T

    def _move_to(self, device) -> None:
        for memory in self.stored + [self.current]:
            memory.delta = memory.delta.to(device)
        self.mask = self.mask.to(device)

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the side memories and the router state to one safetensors file, atomically."""
        if self.current is None:
            raise RuntimeError("nothing to save: attach the editor to a model first")
        tensors = {f"stored.{i}": _cpu(m.delta) for i, m in enumerate(self.stored)}
        tensors["current"] = _cpu(self.current.delta)
        tensors["mask"] = self.mask.to("cpu", torch.uint8).contiguous()
        if self.common is not None and self.common.numel():
            tensors["common"] = _cpu(self.common)
        meta = {
            "config": dataclasses.asdict(self.config),
            "layer": self.layer,
            "model_name": self.model_name,
            "base_fingerprint": self.base_fingerprint,
            "memories": [{"min_act": _finite_or_none(m.min_act), "n_edits": m.n_edits, "floor": m.floor,
                          "in_scores": m.in_scores}
                         for m in self.stored + [self.current]],
            "merged": self.merged,
            "saved_shards": self.saved_shards,
            "global_min_act": _finite_or_none(self.global_min_act),
            "n_edits": self.n_edits,
            "requests": [fact.to_counterfact() for fact in self.requests],
            "negatives": self.negative_prompts,
            "calibration": self.calibration_prompts,
            "templates": self.templates,
            "subjects": self.subjects,
        }
        return save_tensors_atomic(path, tensors, "factlens_wise", meta)

    @classmethod
    def load(cls, path: str | Path) -> "WiseEditor":
        """An editor holding the saved memories, not attached (``attach`` checks that they fit)."""
        tensors, meta = load_tensors(path, "factlens_wise")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        editor = cls(WiseConfig(**config), meta.get("negatives"), meta.get("calibration"), meta.get("templates"),
                     meta.get("subjects"))
        records = [SideMemory(tensors[f"stored.{i}"], _inf_if_none(r["min_act"]), r["n_edits"], r.get("floor", 0.0),
                              list(r.get("in_scores", [])))
                   for i, r in enumerate(meta["memories"][:-1])]
        last = meta["memories"][-1]
        editor.stored = records
        editor.current = SideMemory(tensors["current"], _inf_if_none(last["min_act"]), last["n_edits"],
                                    last.get("floor", 0.0), list(last.get("in_scores", [])))
        editor.mask = tensors["mask"].bool()
        editor.common = tensors.get("common")
        editor.layer, editor.model_name = meta["layer"], meta["model_name"]
        editor.base_fingerprint, editor.merged = meta["base_fingerprint"], meta["merged"]
        editor.saved_shards = meta["saved_shards"]
        editor.global_min_act = _inf_if_none(meta["global_min_act"])
        editor.n_edits = meta["n_edits"]
        editor.requests = [Fact.from_counterfact(r) for r in meta["requests"]]
        return editor


# --- helpers ----------------------------------------------------------------------------------------------


def _real_positions(call: _Call, key: torch.Tensor) -> torch.Tensor | None:
    """Which positions of this call are real tokens (None: all), from the attention mask the model was
    called with; a mask that does not match the hooked batch (a block called directly) is ignored."""
    batch, length = key.shape[:2]
    mask = call.mask
    if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
        return None
    return mask[:, -length:].bool()


def _naming_none(prompts: Sequence[str], subjects: set[str]) -> list[int]:
    """Indices of the prompts that contain none of ``subjects``."""
    return [i for i, prompt in enumerate(prompts) if not any(subject in prompt for subject in subjects)]


def _valid_mask(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _stack_padded(groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate groups of right-padded (keys, valid) rows, padded to one width."""
    width = max(keys.shape[1] for keys, _ in groups)
    keys = torch.cat([torch.nn.functional.pad(k, (0, 0, 0, width - k.shape[1])) for k, _ in groups])
    valid = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for _, v in groups])
    return keys, valid


def _merged(group: Sequence[SideMemory], weights: Sequence[float], density: float) -> SideMemory:
    """TIES of a group of memories; it answers to all their edits, so its threshold is their lowest."""
    delta = ties_merge([m.delta for m in group], weights, density)
    return SideMemory(delta, min(m.min_act for m in group), sum(m.n_edits for m in group),
                      in_scores=[score for m in group for score in m.in_scores])


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _inf_if_none(value: float | None) -> float:
    return math.inf if value is None else value
