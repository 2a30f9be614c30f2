"""Restoration engines: compute p(answer) for every restored (kind, token, layer) cell of one fact.

Two engines give the same numbers (to float rounding):

``ReferenceEngine`` does what kmeng01/rome's ``trace_with_patch`` does: for each cell one forward pass of
a batch holding 1 clean row and N corrupted rows, copying the clean state into the corrupted rows.

``PrefixEngine`` is the fast one. It uses two facts about a causal transformer:

1. Restoring a state at token t changes nothing at positions < t. Those positions are the corrupted run's,
   so their keys/values are taken from the corrupted run's KV cache and only positions >= t are computed.
   Cells at tokens before the subject change nothing at all and are not computed.
2. Restoring a state at layer l changes nothing below l. Blocks are called one by one, and the rows of a
   cell join the batch at the first block they need (l + 1 for the residual stream, the window's first
   layer for MLP/attention); below that their state is read from the corrupted run. Logits are computed
   at the last position only.

Blocks are the bridge's own ``model.blocks[j]``, so hooks on them keep firing. The positional arguments
(attention mask, rotary tables, position ids) each block needs for a suffix are captured from one real
batch-1 forward of that suffix, so the engine never re-derives architecture details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing.adapter import KINDS, ModelAdapter
from tracing.blocks import call_block, capture_block_calls, filled_cache, logits_of
from tracing.metrics import answer_metric
from tracing.state import state_of


def require_full_forwards(model, owner: str, active: bool) -> None:
    """Declare (or withdraw) hooks whose output at a position depends on more than that position's
    causal past *within the same call*: WISE, for instance, routes by a statistic of all earlier
    positions' scores, which a call on a suffix alone cannot see. The fast engine computes suffixes in
    separate block calls, so while any such hook is active tracing uses the reference engine, whose full
    forward passes stay exact."""
    owners = state_of(model).full_forwards
    if active:
        owners.add(owner)
    else:
        owners.discard(owner)


def needs_full_forwards(model) -> bool:
    return bool(state_of(model).full_forwards)


@dataclass(frozen=True)
class Cell:
    """One restoration: state ``kind`` at ``token``, over ``layers`` (one layer for the residual)."""

    kind: str
    token: int
    layer: int


def restored_layers(kind: str, layer: int, n_layers: int, window: int) -> range:
    """Layers restored for a cell, as in ROME: one layer for the residual stream, else a window
    ``max(0, l - window//2) .. min(L, l + ceil(window/2))`` (10 layers for window 10)."""
    if kind == "resid":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass
class TraceInputs:
    """What every cell of one fact shares."""

    tokens: torch.Tensor  # (1, T) long
    subject: tuple[int, int]  # half-open token range
    answer_id: int
    noise: torch.Tensor  # (N, subject length, d_model), model dtype, on the model's device
    counterfactual_id: int | None = None  # set: the metric is logit(answer) - logit(counterfactual)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])


@dataclass
class EngineOutput:
    """The metric (p(answer), or the logit difference, see :mod:`tracing.metrics`) of the clean and the
    corrupted run and of every restored cell; the names say "prob" for ROME's default."""

    clean_prob: float
    corrupted_prob: float
    clean_top_id: int
    scores: dict[str, np.ndarray]  # kind -> (T, L) mean p(answer) over noise samples


def _add_noise_hook(noise: torch.Tensor, subject: tuple[int, int], first_row: int) -> Callable:
    """Adds ``noise`` (one row per sample) to the subject's embeddings of rows ``first_row:first_row + N``."""
    start, end = subject
    rows = slice(first_row, first_row + noise.shape[0])

    def hook(embeddings: torch.Tensor, hook) -> torch.Tensor:
        embeddings = embeddings.clone()
        embeddings[rows, start:end] += noise.to(embeddings.dtype)
        return embeddings

    return hook


def _answer_probs(logits_last: torch.Tensor, inputs: TraceInputs) -> torch.Tensor:
    """The trace's metric per row (p(answer) unless a counterfactual is set)."""
    return answer_metric(logits_last, inputs.answer_id, inputs.counterfactual_id)


@torch.no_grad()
def clean_and_corrupted(model, inputs: TraceInputs, names: Sequence[str] = ()):
    """Clean run (batch 1) and corrupted run (batch N), with the requested activations of each."""
    clean_logits, clean_cache = model.run_with_cache(inputs.tokens, names_filter=lambda n: n in names)
    clean_last = clean_logits[:, -1]
    clean_prob = float(_answer_probs(clean_last, inputs)[0])
    clean_top = int(clean_last[0].argmax())
    return clean_prob, clean_top, clean_cache


class ReferenceEngine:
    """One forward pass per cell over [clean row, N corrupted rows], as kmeng01/rome does it.

    Noising (``direction="noising"``) runs [N corrupted rows, N clean rows] and copies each corrupted
    row's state into its clean partner: the clean run with one state corrupted."""

    def __init__(self, model, show_progress: bool = True) -> None:
        self.model = model
        self.adapter = ModelAdapter.of(model)
        self.show_progress = show_progress

    @torch.no_grad()
    def cell_prob(self, inputs: TraceInputs, cell: Cell, window: int, direction: str = "denoising") -> float:
        model, adapter = self.model, self.adapter
        if direction == "noising":
            return self._noised_cell(inputs, cell, window)
        batch = inputs.tokens.repeat(inputs.samples + 1, 1)
        hooks = [(adapter.embed, _add_noise_hook(inputs.noise, inputs.subject, first_row=1))]

        def restore(state: torch.Tensor, hook) -> torch.Tensor:
            state = state.clone()
            state[1:, cell.token] = state[0, cell.token]
            return state

        for layer in restored_layers(cell.kind, cell.layer, adapter.n_layers, window):
            hooks.append((adapter.state_hook(cell.kind, layer), restore))
        logits = model.run_with_hooks(batch, fwd_hooks=hooks)
        return float(_answer_probs(logits[1:, -1], inputs).mean())

    def _noised_cell(self, inputs: TraceInputs, cell: Cell, window: int) -> float:
        samples = inputs.samples
        batch = inputs.tokens.repeat(2 * samples, 1)
        hooks = [(self.adapter.embed, _add_noise_hook(inputs.noise, inputs.subject, first_row=0))]

        def corrupt(state: torch.Tensor, hook) -> torch.Tensor:
            state = state.clone()
            state[samples:, cell.token] = state[:samples, cell.token]
            return state

        for layer in restored_layers(cell.kind, cell.layer, self.adapter.n_layers, window):
            hooks.append((self.adapter.state_hook(cell.kind, layer), corrupt))
        logits = self.model.run_with_hooks(batch, fwd_hooks=hooks)
        return float(_answer_probs(logits[samples:, -1], inputs).mean())

    @torch.no_grad()
    def corrupted_prob(self, inputs: TraceInputs) -> float:
        batch = inputs.tokens.repeat(inputs.samples, 1)
        hooks = [(self.adapter.embed, _add_noise_hook(inputs.noise, inputs.subject, first_row=0))]
        logits = self.model.run_with_hooks(batch, fwd_hooks=hooks)
        return float(_answer_probs(logits[:, -1], inputs).mean())

    def run(self, inputs: TraceInputs, kinds: Iterable[str], window: int, direction: str = "denoising",
            tokens: Sequence[int] | None = None) -> EngineOutput:
        """Every cell, or the cells at ``tokens`` only (the others keep the corrupted score)."""
        kinds = list(kinds)
        clean_prob, clean_top, _ = clean_and_corrupted(self.model, inputs)
        corrupted = self.corrupted_prob(inputs)
        n_layers, n_tokens = self.adapter.n_layers, inputs.n_tokens
        scores = {kind: np.full((n_tokens, n_layers), corrupted) for kind in kinds}
        positions = range(n_tokens) if tokens is None else tokens
        cells = [Cell(k, t, l) for k in kinds for t in positions for l in range(n_layers)]
        for cell in tqdm(cells, desc="tracing (reference)", disable=not self.show_progress, leave=False):
            scores[cell.kind][cell.token, cell.layer] = self.cell_prob(inputs, cell, window, direction)
        return EngineOutput(clean_prob, corrupted, clean_top, scores)


class PrefixEngine:
    """Fast engine: prefix KV reuse + per-block entry of rows + last-position logits (see module doc)."""

    def __init__(self, model, show_progress: bool = True, max_rows: int = 2048) -> None:
        self.model = model
        self.adapter = ModelAdapter.of(model)
        self.show_progress = show_progress
        self.max_rows = max_rows

    # --- the two shared runs ------------------------------------------------------------------------
    @torch.no_grad()
    def _corrupted_run(self, inputs: TraceInputs):
        """Batch-N corrupted forward: per-layer residual states and the full KV cache."""
        adapter = self.adapter
        names = {adapter.resid_in(l) for l in range(adapter.n_layers)}
        names |= {adapter.resid_out(l) for l in range(adapter.n_layers)}
        states: dict[str, torch.Tensor] = {}

        def keep(state: torch.Tensor, hook) -> None:
            states[hook.name] = state.detach()

        hooks = [(adapter.embed, _add_noise_hook(inputs.noise, inputs.subject, first_row=0))]
        hooks += [(name, keep) for name in sorted(names)]
        logits, kv = filled_cache(self.model, inputs.tokens.repeat(inputs.samples, 1), hooks=hooks)
        probs = _answer_probs(logits[:, -1], inputs)
        return float(probs.mean()), states, kv

    # --- one suffix pass --------------------------------------------------------------------------
    def _run_suffix(self, inputs: TraceInputs, token: int, cells: Sequence[Cell], window: int,
                    clean: dict[str, torch.Tensor], corrupted: dict[str, torch.Tensor], kv,
                    call_args: list[tuple[tuple, dict]]) -> np.ndarray:
        """Mean p(answer) for cells that all restore ``token`` (so all share the suffix ``token:``)."""
        model, adapter = self.model, self.adapter
        n_layers, samples = adapter.n_layers, inputs.samples
        device = inputs.tokens.device
        entry = [cell.layer + 1 if cell.kind == "resid" else
                 restored_layers(cell.kind, cell.layer, n_layers, window).start for cell in cells]
        spans = [restored_layers(cell.kind, cell.layer, n_layers, window) for cell in cells]
        kind_code = {kind: i for i, kind in enumerate(KINDS)}
        sample_of_new = torch.arange(samples, device=device)

        hidden: torch.Tensor | None = None
        row_cell = torch.empty(0, dtype=torch.long, device=device)
        row_sample = torch.empty(0, dtype=torch.long, device=device)
        cell_kind = torch.tensor([kind_code[c.kind] for c in cells], device=device)
        cell_lo = torch.tensor([s.start for s in spans], device=device)
        cell_hi = torch.tensor([s.stop for s in spans], device=device)
        patch_rows: dict[str, torch.Tensor] = {}
        current_layer = [0]

        def entering(layer: int) -> torch.Tensor | None:
            """Starting states of the rows of cells whose first block is ``layer``."""
            members = [i for i, e in enumerate(entry) if e == layer]
            if not members:
                return None
            blocks = []
            for i in members:
                cell = cells[i]
                if cell.kind == "resid":
                    state = corrupted[adapter.resid_out(layer - 1)][:, token:].clone()
                    state[:, 0] = clean[adapter.resid_out(layer - 1)][0, token]
                else:
                    state = corrupted[adapter.resid_in(layer)][:, token:]
                blocks.append(state)
            nonlocal row_cell, row_sample
            row_cell = torch.cat([row_cell, torch.tensor(members, device=device).repeat_interleave(samples)])
            row_sample = torch.cat([row_sample, sample_of_new.repeat(len(members))])
            return torch.cat(blocks)

        def make_patch_hook(kind: str) -> Callable:
            def patch(state: torch.Tensor, hook) -> torch.Tensor:
                rows = patch_rows.get(kind)
                if rows is None or rows.numel() == 0:
                    return state
                state = state.clone()  # under a device map the layer may sit on another GPU than the indices
                restored = clean[adapter.state_hook(kind, current_layer[0])][0, token]
                state[rows.to(state.device), 0] = restored.to(state.device, state.dtype)
                return state
            return patch

        patch_kinds = sorted({c.kind for c in cells} - {"resid"})
        hooks = [(adapter.state_hook(kind, layer), make_patch_hook(kind))
                 for kind in patch_kinds for layer in range(n_layers)]
        with model.hooks(fwd_hooks=hooks):
            for layer in range(n_layers):
                new = entering(layer)
                if new is not None:
                    hidden = new if hidden is None else torch.cat([hidden, new.to(hidden.device)])
                if hidden is None:
                    continue
                current_layer[0] = layer
                in_window = (cell_lo[row_cell] <= layer) & (layer < cell_hi[row_cell])
                for kind in patch_kinds:
                    patch_rows[kind] = torch.nonzero(in_window & (cell_kind[row_cell] == kind_code[kind])).flatten()
                keys, values = kv[layer]
                samples_here = row_sample.to(keys.device)
                hidden = call_block(model, layer, hidden, call_args[layer],
                                    keys[samples_here, :, :token], values[samples_here, :, :token])
        last = entering(n_layers)
        finals = [] if hidden is None else [hidden[:, -1].to(device)]
        if last is not None:
            finals.append(last[:, -1].to(device))
        final = torch.cat(finals)
        logits = logits_of(model, final)
        probs = _answer_probs(logits, inputs)
        means = torch.zeros(len(cells), device=device).index_add_(0, row_cell, probs) / samples
        return means.cpu().numpy()

    # --- all cells -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs: TraceInputs, kinds: Iterable[str], window: int,
            tokens: Sequence[int] | None = None) -> EngineOutput:
        """Every cell, or the cells at ``tokens`` only (the others keep the corrupted score)."""
        kinds = list(kinds)
        adapter = self.adapter
        n_layers, n_tokens = adapter.n_layers, inputs.n_tokens
        clean_names = [adapter.state_hook(kind, l) for kind in set(kinds) | {"resid"} for l in range(n_layers)]
        clean_prob, clean_top, clean_cache = clean_and_corrupted(self.model, inputs, clean_names)
        clean = {name: clean_cache[name] for name in clean_names}
        corrupted_prob, corrupted, kv = self._corrupted_run(inputs)

        scores = {kind: np.full((n_tokens, n_layers), corrupted_prob) for kind in kinds}
        first = inputs.subject[0]  # restoring anything before the subject is a no-op
        cells_per_chunk = max(1, self.max_rows // inputs.samples)
        positions = [t for t in (range(n_tokens) if tokens is None else tokens) if t >= first]
        progress = tqdm(total=len(positions) * len(kinds) * n_layers, desc="tracing", unit="cell",
                        disable=not self.show_progress, leave=False)
        with progress:
            for token in positions:
                prefix = [(k[:1, :, :token], v[:1, :, :token]) for k, v in kv]
                call_args = capture_block_calls(self.model, inputs.tokens[:, token:], prefix).arguments
                cells = [Cell(kind, token, layer) for kind in kinds for layer in range(n_layers)]
                for i in range(0, len(cells), cells_per_chunk):
                    chunk = cells[i: i + cells_per_chunk]
                    means = self._run_suffix(inputs, token, chunk, window, clean, corrupted, kv, call_args)
                    for cell, value in zip(chunk, means):
                        scores[cell.kind][cell.token, cell.layer] = value
                    progress.update(len(chunk))
        return EngineOutput(clean_prob, corrupted_prob, clean_top, scores)
