"""Threshold floors for WISE's memories, calibrated on fact prompts they were never trained on.

Margins alone do not separate edits from other facts, and the paper's threshold (a ratio of the weakest
edit's score) sits below what many unrelated facts score. So each memory's threshold is also floored by a
quantile of its scores on held-out prompts that no edit is meant to answer, jointly over all memories by
default, since under WISE-Retrieve a prompt passing any memory's threshold is routed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from editing.wise.config import WiseConfig
from editing.wise.memory import SideMemory
from editing.wise.relations import Relations, naming_none
from editing.wise.routing import activation_scores, calibrated_floors, row_score
from tracing.facts import Fact


class FloorCalibrator:
    """Sets memories' floors from ``prompts`` (the calibration prompts) and their ``rows`` (keys, valid),
    following ``config``'s ``calibration_quantile`` / ``calibration_mode`` / ``calibration_scope``;
    ``relations`` tells which relation a prompt asks about. ``eligible`` (memories, prompts), under the
    subject gate: which memories each prompt may reach at all; a memory's floor is then set by the prompts
    that may reach it (the others score 0 for it: the gate already keeps them out)."""

    def __init__(self, prompts: Sequence[str], rows: tuple[torch.Tensor, torch.Tensor], relations: Relations,
                 config: WiseConfig, eligible: torch.Tensor | None = None) -> None:
        self.prompts, self.rows, self.relations, self.config = prompts, rows, relations, config
        self.eligible = eligible

    @torch.no_grad()
    def refresh(self, memories: Sequence[SideMemory], facts: Sequence[Fact]) -> None:
        """Set every memory's floor from its scores on the calibration prompts outside the scope of every
        fact edited (``facts``), so that such prompts are seldom routed. ``calibration_mode="memory"``:
        each memory's floor is the ``calibration_quantile`` of its own scores. ``"joint"``: each floor is
        ``c`` x the memory's :attr:`SideMemory.scale`, one ``c`` for all: the quantile over the prompts of
        their largest score-to-scale ratio over the memories, which then bounds the routed share of such
        prompts for all the memories together (with one memory the two agree)."""
        kept = self.out_of_scope(self.prompts, facts)
        if not memories or not kept:
            for memory in memories:
                memory.floor = 0.0
            return
        index = torch.tensor(kept)
        scores = torch.stack([self.scores(memory)[index] for memory in memories])  # (M, N)
        if self.eligible is not None:
            scores = scores * self.eligible[:, index].to(scores.dtype)
        for memory, floor in zip(memories, calibrated_floors(scores, [m.scale for m in memories],
                                                             self.config.calibration_quantile,
                                                             self.config.calibration_mode)):
            memory.floor = floor

    def scores(self, memory: SideMemory) -> torch.Tensor:
        """The memory's score on every calibration prompt (cached on it until its Δ changes), on the CPU."""
        if memory.calibration_scores is None:
            keys, valid = (t.to(memory.delta.device) for t in self.rows)
            scores = row_score(activation_scores(keys, memory.delta), valid, self.config.score)
            memory.calibration_scores = scores.float().cpu()
        return memory.calibration_scores

    def out_of_scope(self, prompts: Sequence[str], facts: Sequence[Fact]) -> list[int]:
        """Indices of the prompts that no fact's edit is meant to answer. ``calibration_scope="subject"``
        leaves out every prompt naming an edited subject; ``"fact"`` keeps those that ask about an edited
        subject in another relation (by the templates; a prompt whose relation cannot be told is left out)."""
        subjects = {fact.subject for fact in facts}
        if self.config.calibration_scope == "subject":
            return naming_none(prompts, subjects)
        edited = {(fact.subject, self.relations.relation_of(fact)) for fact in facts}
        kept = []
        for i, prompt in enumerate(prompts):
            named = [subject for subject in subjects if subject in prompt]
            parsed = self.relations.parse(prompt) if named else None
            if not named or (parsed is not None and parsed not in edited and named == [parsed[0]]):
                kept.append(i)
        return kept
