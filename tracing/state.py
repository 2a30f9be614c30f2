"""What factlens remembers about a model, in one typed object beside it (never attributes on it).

Measurements that depend only on the weights (the subject-embedding std), whether the fast tracing engine
was verified on this model, which hooks need full forward passes, the stack of applied weight edits, the
attached memory editors and small text caches. Kept in a weak dictionary keyed by the model, so it goes
away with the model and ``model.__dict__`` holds nothing of ours.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelState:
    """Per-model state; see :func:`state_of`."""

    subject_std: float | None = None  # std of subject token embeddings (noise scale), measured once
    fast_engine_ok: bool | None = None  # None: not verified yet; True: verified; False: refused, use reference
    full_forwards: set[str] = field(default_factory=set)  # owners of hooks that need whole-prompt forwards
    edit_stack: list[Any] = field(default_factory=list)  # applied WeightEdits, most recent last
    attached: dict[str, Any] = field(default_factory=dict)  # hook-based editor attached per kind ("wise", ...)
    text_caches: dict[str, dict] = field(default_factory=dict)  # sampled texts by purpose, then by key


_STATES: "weakref.WeakKeyDictionary[Any, ModelState]" = weakref.WeakKeyDictionary()


def state_of(model) -> ModelState:
    """The :class:`ModelState` of ``model`` (created empty on first use)."""
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = ModelState()
    return state


def text_cache(model, purpose: str) -> dict:
    """A dict for cached sampled texts of one purpose (e.g. MEMIT's context templates) on ``model``."""
    return state_of(model).text_caches.setdefault(purpose, {})
