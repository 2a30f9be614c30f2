"""WISE's hyperparameters and its default layer.

Every choice that differs from EasyEdit is a field here, with the value measured best on SmolLM2; what
each one does and what it changed is in docs/wise.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editing.relation_keys import default_relation_layer
from editing.side_layer import default_layer

SCORES = ("max", "mean")
SCORE_POSITIONS = ("prompt", "target")
CALIBRATION_SCOPES = ("fact", "subject")
CALIBRATION_MODES = ("joint", "memory")
CHOICES = ("ratio", "score")
MARGIN_MEANS = ("all", "violated")
ROUTE_MATCHES = ("any", "subject")
LOC_PREFIXES = ("In", "We", "It", "My", "This", "When", "There", "She", "He", "They", "A", "After", "For", "If",
                "On", "One", "Our", "Today", "What", "How", "Why", "Yesterday", "Please", "Thanks", "Water",
                "Music", "Science", "Python", "Dear", "Once", "Most", "Every")


@dataclass(frozen=True)
class WiseConfig:
    """WISE hyperparameters. The defaults are EasyEdit's algorithm (the ``wise-easyedit`` preset: its
    LLaMA-2-7B values, routing loss and threshold rule) behind the subject gate, with a side memory per 10
    edits that is never merged. That is the configuration measured best on SmolLM2 (docs/wise.md; bundled
    facts, calls of 10, one stream): Rel / Gen / Loc / Unrel 1.00 / 0.85 / 1.00 / 1.00 at T = 10, 0.98 /
    0.78 / 1.00 / 1.00 at T = 50 and 0.97 / 0.76 / 0.99 / 0.99 at T = 100, against 0.885 / 0.42 / 1.00 /
    1.00 at T = 100 with the earlier defaults and 0.45 / 0.33 / 0.37 / 0.36 for the preset.

    ``route_match="subject"`` puts a gate before the score (:mod:`editing.wise.subject_gate`): a position may
    reach a memory only once the tokens so far spell a subject edited into it (its token ids in the edit
    prompt, in each context template, alone and after a space). With the gate keeping other subjects out,
    the negatives, calibrated floors and common directions this implementation added for the score-only
    router (``route_match="any"``) cost answers and bought no locality, so they are off by default and stay
    options: ``negatives`` / ``calibration`` / ``subject_negatives`` / ``relation_negatives`` /
    ``corrupted_samples`` / ``common_directions`` / ``replay`` (docs/wise.md has what each measured).

    ``relation_similarity`` (off by default) narrows the gate further with the subject memory's relation
    check (:mod:`editing.relation_keys`): a match opens its memory only from the first later position that
    asks the edit's relation, read at ``relation_layer`` before the side layer. At T = 300 (0.5): Loc / Unrel
    0.968 / 0.963 -> 0.992 / 0.995, Gen 0.718 -> 0.694 (docs/wise.md).

    ``train_from_subject`` (off, as EasyEdit trains): behind the gate, Δ acts on the edit rows in training only
    from the subject's last token on, where the gate lets it act at inference. Over six 10-edit streams it
    moved Gen. by -0.15 to +0.10 per stream (+0.03 on the mean): not a measured gain (docs/wise.md).

    ``alpha`` / ``beta`` / ``gamma`` are norms of changes to the side layer's d_model output, so they scale
    with the model; EasyEdit's 5 / 20 / 10 are for 7B models. For the score-only router on SmolLM2 we
    measured margins x 4 (20 / 80 / 40) better (10 edits, Rel/Gen/Loc 0.95/0.55/0.97 against
    0.95/0.57/0.93); behind the gate EasyEdit's are kept.
    """

    method: ClassVar[str] = "wise"  # the registered method an editor with this config is

    layer: int | None = None  # None: default_layer(n_layers)
    n_iter: int = 70
    edit_lr: float = 1.0
    mask_ratio: float = 0.2  # ρ: fraction of Δ's entries a shard trains
    alpha: float = 5.0  # unrelated inputs score below this
    beta: float = 20.0  # edit inputs score above this
    gamma: float = 10.0  # and at least this much above unrelated ones
    act_ratio: float = 0.88  # threshold = act_ratio x smallest in-scope score
    norm_constraint: float = 1.0  # |Δ| <= this, elementwise
    save_freq: int = 10  # edits per knowledge shard (EasyEdit: 500)
    merge_freq: int = 0  # edits between TIES merges, a multiple of save_freq; 0: never merge (EasyEdit: 1000)
    density: float = 0.53  # TIES: fraction of each shard's entries kept
    retrieve: bool = True  # WISE-Retrieve (True) or WISE-Merge (False)
    score: str = "mean"  # routing statistic over the positions so far: "mean" (EasyEdit's) or running "max"
    score_positions: str = "target"  # margins and thresholds read all "target" positions, or the "prompt"'s last
    stop_loss: float = 0.02  # stop early once the loss is this low ...
    stop_change: float = 1e-4  # ... and changed less than this since the previous step
    context_prefixes: tuple[str, ...] = ("I", "You", "Because", "Yes", "Q:")
    context_length: int = 10  # tokens of each generated context, prefix included
    loc_prefixes: tuple[str, ...] = LOC_PREFIXES  # one model-written unrelated text per prefix
    loc_length: int = 16
    replay: int = 0  # earlier edits of the shard whose scores each edit keeps up (0: none, EasyEdit's)
    corrupted_samples: int = 0  # noisy-subject copies of each edit prompt among the unrelated rows
    negatives: int = 0  # fact-shaped prompts about other subjects kept at attach (0: none)
    negatives_per_edit: int = 0  # of which each edit call trains against this many, drawn anew
    calibration: int = 0  # further such prompts, never trained on, that set each memory's threshold floor
    calibration_quantile: float = 1.0  # the floor: this quantile of a memory's scores on them
    calibration_mode: str = "joint"  # one floor scale for all memories ("joint") or each its own ("memory")
    subject_negatives: int = 0  # per edited fact: prompts about its subject in other relations (0: none)
    relation_negatives: int = 0  # per edited fact: its relation's templates about other, unedited subjects
    subject_prefix: bool = False  # each edit row up to its subject's last token is an unrelated row
    calibration_scope: str = "fact"  # calibration leaves out prompts of edited facts, or of edited "subject"s
    common_directions: int = 0  # top directions of generic keys the side memories ignore (0: none)
    noise_multiplier: float = 3.0  # their noise, in subject-embedding stds (ROME's 3)
    choose: str = "score"  # of several memories above threshold: largest "score", or furthest above as a "ratio"
    margin_mean: str = "violated"  # each margin term averages its hinge over the "violated" rows, or "all"
    weight_decay: float = 1e-5  # SGD weight decay on the side weight W + Δ, every entry (EasyEdit's)
    bare_contexts: bool = False  # the context prefixes without a prompt are unrelated rows
    route_match: str = "subject"  # only prompts spelling a subject edited into a memory may reach it; "any"
    train_from_subject: bool = False  # behind the gate, Δ acts on the edit rows from the subject's last token
    relation_similarity: float | None = None  # and a later position asks the edit's relation this clearly
    relation_layer: int | None = None  # the residual the relation check reads (None: 0.8 of the depth, < layer)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.save_freq < 1 or self.merge_freq < 0 or self.merge_freq % self.save_freq:
            raise ValueError("save_freq must be >= 1 and merge_freq 0 (never merge) or a multiple of save_freq")
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
        if self.choose not in CHOICES:
            raise ValueError(f"choose must be one of {CHOICES}, not {self.choose!r}")
        if self.margin_mean not in MARGIN_MEANS:
            raise ValueError(f"margin_mean must be one of {MARGIN_MEANS}, not {self.margin_mean!r}")
        if self.route_match not in ROUTE_MATCHES:
            raise ValueError(f"route_match must be one of {ROUTE_MATCHES}, not {self.route_match!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if self.relation_similarity is not None:
            if not -1.0 <= self.relation_similarity <= 1.0:
                raise ValueError(f"relation_similarity must be in [-1, 1], not {self.relation_similarity}")
            if self.route_match != "subject":
                raise ValueError("the relation check narrows the subject gate: it needs route_match='subject'")

    def resolved_layer(self, n_layers: int) -> int:
        layer = default_layer(n_layers) if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
        return layer

    def resolved_relation_layer(self, n_layers: int) -> int:
        """The relation check reads the residual after this block, in the same forward as the side layer's
        routing: so before the side layer."""
        layer = self.resolved_layer(n_layers)
        if self.relation_layer is None:
            return max(0, min(default_relation_layer(n_layers), layer - 1))
        if not 0 <= self.relation_layer < layer:
            raise ValueError(f"relation_layer must be in [0, {layer}) (before the side layer), got {self.relation_layer}")
        return self.relation_layer
