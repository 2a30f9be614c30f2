"""Permanent hooks: editors that live on a model (WISE's router, GRACE's codebook) hook it for as long as
they are attached, so their hooks must survive ``model.reset_hooks()`` (which tracing calls freely) and
must come off again exactly, leaving every other hook where it was."""

from __future__ import annotations

from typing import Callable, Sequence


def add_permanent_hooks(model, hooks: Sequence[tuple[str, Callable]]) -> list:
    """Add forward hooks that survive ``model.reset_hooks()`` and run before any other hook at their
    points; returns handles for :func:`remove_hooks`, which removes exactly these."""
    points = model.hook_dict
    return [(points[name], points[name].add_hook(fn, is_permanent=True, prepend=True)) for name, fn in hooks]


def remove_hooks(handles: list) -> None:
    """Remove the hooks :func:`add_permanent_hooks` returned handles for."""
    for hook_point, handle in handles:
        handle.hook.remove()
        hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not handle]
