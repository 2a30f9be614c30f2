"""One activation of a batch of token rows, read with a forward that stops as early as it may.

Editors read the same kind of thing again and again: the down-projection input ("the key" of MEMIT's
W k = v, WISE's router, GRACE's codebook) or the residual stream at one layer, at every position or at
one position per row. Reading it in one place keeps padding, early stopping and dtype the same for all.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tracing.tokens import right_padded


@torch.no_grad()
def activations_at(model, rows: Sequence[Sequence[int]], hook_name: str, stop_at_layer: int | None,
                   positions: Sequence[int] | None = None, hooks: Sequence[tuple[str, Callable]] = (),
                   batch_size: int | None = None) -> torch.Tensor:
    """The activation at ``hook_name`` of right-padded token ``rows``, as float32.

    ``positions`` None: every position, (rows, longest row, width), padding included (zero it with the
    rows' lengths); one index per row: the activation there, (rows, width). The forward stops before block
    ``stop_at_layer`` (None: runs to the end). ``hooks`` run before the read (e.g. noise on the
    embeddings), on every batch; ``batch_size`` None reads all rows in one forward.
    """
    size = len(rows) if batch_size is None else batch_size
    collected: list[torch.Tensor] = []
    for start in range(0, len(rows), size):
        batch = rows[start: start + size]
        captured: dict[str, torch.Tensor] = {}

        def keep(value: torch.Tensor, hook) -> None:
            if positions is None:
                captured["value"] = value.detach().float()
            else:
                index = torch.tensor(list(positions[start: start + size]))
                captured["value"] = value[torch.arange(len(batch)), index.to(value.device)].detach().float()

        model.run_with_hooks(right_padded(model, batch), fwd_hooks=[*hooks, (hook_name, keep)],
                             stop_at_layer=stop_at_layer)
        collected.append(captured["value"])
    if len(collected) == 1:
        return collected[0]
    if positions is None:  # each batch was padded to its own longest row: pad all to the longest
        width = max(len(row) for row in rows)
        collected = [torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in collected]
    return torch.cat(collected)
