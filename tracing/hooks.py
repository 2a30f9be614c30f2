"""Permanent hooks: editors that live on a model (WISE's router, GRACE's codebook) hook it for as long as
they are attached, so their hooks must survive ``model.reset_hooks()`` (which tracing calls freely) and
must come off again exactly, leaving every other hook where it was."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from transformer_lens.hook_points import HookPoint


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


@contextmanager
def hooks_suspended(model) -> Iterator[None]:
    """No forward hook of ``model`` runs inside the block (permanent ones included), and a forward run there
    leaves an enclosing forward's hooks and stop layer as they were. For a forward nested in a hook: the
    subject memory reads a later layer of the unedited model from inside its hook at an earlier one, where
    the enclosing forward's own hooks (a capture of another batch, tracing's noise) must not fire. Built on
    TransformerLens 4.3's HookPoint (torch forward hooks plus its handle list) and the bridge's per-block
    stop flag, which a nested ``stop_at_layer`` forward would otherwise clear."""
    points = [module for module in model.modules() if isinstance(module, HookPoint)]
    saved = [(point, point._forward_hooks, point._forward_pre_hooks, point.fwd_hooks) for point in points]
    blocks = list(getattr(model, "blocks", []))
    stops = [getattr(block, "_stop_at_layer_idx", None) for block in blocks]
    for point in points:
        point._forward_hooks, point._forward_pre_hooks, point.fwd_hooks = OrderedDict(), OrderedDict(), []
    try:
        yield
    finally:
        for point, forward_hooks, pre_hooks, handles in saved:
            point._forward_hooks, point._forward_pre_hooks, point.fwd_hooks = forward_hooks, pre_hooks, handles
        for block, stop in zip(blocks, stops):
            block._stop_at_layer_idx = stop
