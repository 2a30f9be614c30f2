"""The editor interface for methods that write into the weights (MEMIT, ROME, and any other method that
returns a :class:`~editing.weights.WeightEdit`): a stack of applied edits, undone in reverse."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from editing.editor import Editor, as_facts
from editing.requests import validate_requests
from editing.weights import WeightEdit, load_edit_sequence, save_edit_sequence
from tracing.facts import Fact

EditFunction = Callable[[Any, Sequence[Fact], Any], WeightEdit]  # (model, facts, config) -> applied edit


class WeightEditor(Editor):
    """Each ``edit(facts)`` applies one :class:`WeightEdit` on top of the earlier ones; ``undo()`` takes
    them all back, so the weights are the unedited ones bit for bit."""

    routes = False

    def __init__(self, method: str, model, config, compute: EditFunction) -> None:
        self.method = method
        self.model, self.config, self._compute = model, config, compute
        self.edits: list[WeightEdit] = []

    def edit(self, facts: Fact | Sequence[Fact]) -> WeightEdit:
        requests = validate_requests(self.model, as_facts(facts), earlier=self.facts)
        edit = self._compute(self.model, requests, self.config)
        self.edits.append(edit)
        return edit

    @property
    def facts(self) -> list[Fact]:
        return [fact for edit in self.edits for fact in edit.requests]

    def undo(self) -> None:
        while self.edits:
            self.edits[-1].undo(self.model)
            self.edits.pop()

    def save(self, path: str | Path) -> Path:
        return save_edit_sequence(path, self.edits)

    @classmethod
    def load(cls, method: str, path: str | Path, model, config, compute: EditFunction) -> "WeightEditor":
        """An editor on ``model`` with the saved edits applied in order (each checks its fingerprints)."""
        editor = cls(method, model, config, compute)
        editor._apply_saved(load_edit_sequence(path), path)
        return editor

    def _apply_saved(self, edits: list[WeightEdit], path) -> None:
        """Apply saved edits of this method in order; on any refusal, none stays applied."""
        wrong = sorted({edit.method for edit in edits} - {self.method})
        if wrong:
            raise ValueError(f"{path} holds {', '.join(wrong)} edits, not {self.method}")
        try:
            for edit in edits:
                self.edits.append(edit.apply(self.model))
        except Exception:
            self.undo()  # nothing half-loaded stays on the model
            raise
