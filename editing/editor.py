"""One interface for every editing method, and a typed registry of the methods by name.

Every method (MEMIT, ROME, WISE, GRACE, and the ones to come) is an :class:`Editor` bound to one model:

* ``edit(facts)``: one fact or many, written in one call; bad requests are refused before anything changes;
* ``facts``: every fact this editor has written, in order;
* ``route(prompts)``: which memory or codebook entry answers each prompt, where the method has memories
  (:attr:`Editor.routes`); weight editors have none and raise;
* ``undo()``: the model computes exactly what it computed before the first edit (weights bit for bit,
  hooks removed);
* ``save(path)`` / ``Method.load(path, model)``: atomic safetensors files, fingerprinted against the weights
  the edits were made on, so loading onto another model is refused.

CLIs, benchmarks and figures pick methods by name: ``create_editor("wise", model, WiseConfig(...))``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from tracing.facts import Fact


@dataclass(frozen=True)
class Route:
    """Where a prompt is answered from: ``memory`` is the index of the memory (or codebook entry) that
    answers it, None for the model's own weights."""

    prompt: str
    memory: int | None


class Editor(ABC):
    """An editing method bound to one model; see the module docstring for the contract."""

    method: ClassVar[str]
    routes: ClassVar[bool] = False  # whether route() says which memory answers a prompt
    model: Any
    config: Any

    @abstractmethod
    def edit(self, facts: Fact | Sequence[Fact]) -> Any:
        """Write ``facts`` (one or many, in one call); returns the method's record of what it did."""

    @property
    @abstractmethod
    def facts(self) -> list[Fact]:
        """Every fact this editor has written, in order."""

    @abstractmethod
    def undo(self) -> None:
        """Return the model to exactly what it computed before this editor's first edit."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write everything needed to re-apply these edits to ``path`` (atomically); returns the path."""

    def route(self, prompts: Sequence[str]) -> list[Route]:
        """Which memory answers each prompt (methods with memories override this)."""
        raise NotImplementedError(f"{self.method} writes into the weights: it has no memories to route to")


class HookedEditor(Editor):
    """An editor that lives on permanent hooks (GRACE, the subject memory): ``detach`` (= ``undo``)
    removes them and leaves the unedited model; the memory stays in the object, and ``attach`` puts it back.
    Subclasses keep their hook handles in ``_handles`` and the facts they wrote in ``edited``."""

    _handles: list
    edited: list[Fact]

    def detach(self) -> None:
        from tracing.hooks import remove_hooks

        remove_hooks(self._handles)
        self._handles, self.model = [], None

    def undo(self) -> None:
        """The unedited model again (hooks removed; the memory stays in this object)."""
        if self.model is not None:
            self.detach()

    @property
    def facts(self) -> list[Fact]:
        return list(self.edited)


def as_facts(facts: Fact | Sequence[Fact]) -> list[Fact]:
    """One fact or many, as a list."""
    return [facts] if isinstance(facts, Fact) else list(facts)


@dataclass(frozen=True)
class Method:
    """A registered editing method: its config class, how to make an editor on a model, how to load one."""

    name: str
    config_class: type
    create: Callable[[Any, Any], Editor]  # (model, config) -> editor bound to the model
    load: Callable[[str | Path, Any], Editor]  # (path, model) -> editor with the saved edits applied
    lifelong: bool  # edits one stream of calls without revisiting earlier ones (WISE, GRACE, ...)
    summary: str


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"an editing method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _ensure_builtin() -> None:
    importlib.import_module("editing.builtin_methods")  # registers memit, rome, wise, grace


def methods() -> dict[str, Method]:
    """Every registered method by name."""
    _ensure_builtin()
    return dict(_METHODS)


def method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ValueError that lists the known ones."""
    known = methods()
    if name not in known:
        raise ValueError(f"unknown editing method {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def create_editor(name: str, model, config: Any = None) -> Editor:
    """An editor of method ``name`` on ``model``; ``config`` defaults to the method's config class."""
    chosen = method(name)
    if config is None:
        config = chosen.config_class()
    elif not isinstance(config, chosen.config_class):
        raise TypeError(f"{name} takes a {chosen.config_class.__name__}, got {type(config).__name__}")
    return chosen.create(model, config)


def load_editor(name: str, path: str | Path, model) -> Editor:
    """An editor of method ``name`` with the edits saved at ``path`` applied to ``model``."""
    return method(name).load(path, model)
