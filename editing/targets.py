"""MEMIT's target vectors z (``compute_z``): what the residual stream after the last edited layer should
hold at the subject's last token for the model to say the new target.

For each request, a shift δ is added to that hidden state and trained with Adam so that, over every
context template, the teacher-forced target tokens get high probability (mean per-token NLL), plus
``kl_factor`` x KL(current || initial) of the next-token distribution at the subject's last token of
"{subject} is a", plus ``weight_decay`` x ||δ|| / ||z0||²; after each step δ is clamped to
``clamp_norm_factor`` x ||z0||. A request stops once its loss is below the threshold.

``keep_templates`` (optional, per request: its subject asked about in other relations) add ``keep_factor`` x
the mean KL(current || initial) of the next-token distribution at the *last* token of each: the answers
the subject's other facts get must not move with δ (an edit of one relation, not of the whole subject).

How it is made fast: δ enters at the subject's last token after block ``layer``, so everything before
that token and below that layer is fixed. Those keys/values are computed once; each step runs only the
remaining blocks on the tokens from the subject's last token on. Rows are grouped by that suffix length
(no padding is computed) and rows of finished requests leave their group.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from editing.precision import warn_if_slower
from editing.prompts import in_context, subject_row
from tracing.adapter import ModelAdapter
from tracing.blocks import BlockCalls, call_block, capture_block_calls, filled_cache, logits_of
from tracing.facts import SLOT, Fact
from tracing.placement import input_device
from tracing.tokens import target_token_ids

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class TargetConfig:
    """The hyperparameters of ``compute_z`` (MEMIT's GPT-J values)."""

    lr: float = 0.5
    steps: int = 25
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    loss_threshold: float = 5e-2
    batch_requests: int = 32
    keep_factor: float = 1.0  # weight of the mean KL on the keep prompts (when any are given)
    # "bfloat16": the optimisation's forward and backward through the later blocks under autocast (weights,
    # z0 and the δ being trained stay in the model's dtype). 1.9x faster on CPUs with bf16 matrix units
    # (docs/memit_speed.md measures z and ES/PS/NS against float32), 24-46x slower on CPUs without them,
    # where it warns (editing.precision); None: the model's own dtype.
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"TargetConfig.autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")


@dataclass
class _Row:
    ids: tuple[int, ...]
    lookup: int
    request: int
    targets: list[tuple[int, int, float]] = field(default_factory=list)  # (suffix position, token, weight)
    kl: bool = False
    keep: int | None = None  # index among the keep rows: the distribution after the last token is held

    @property
    def suffix_length(self) -> int:
        return len(self.ids) - self.lookup


def _rows_for(model, requests: Sequence[Fact], templates: list[list[str]],
              keep_templates: Sequence[Sequence[str]] | None = None) -> tuple[list[_Row], list[int]]:
    """All rows of a batch of requests, and each request's bare-prompt row."""
    contexts = [context for group in templates for context in group]
    rows: list[_Row] = []
    bare: list[int] = []
    for r, fact in enumerate(requests):
        target = target_token_ids(model, fact.target_new)
        for c, context in enumerate(contexts):
            row = subject_row(model, in_context(context, fact.template), fact.subject)
            if c == 0:
                bare.append(len(rows))
            weight = 1.0 / len(target) / len(contexts)
            end = len(row) - 1 - row.lookup  # suffix position that predicts the first target token
            rows.append(_Row(row.ids + tuple(target[:-1]), row.lookup, r,
                             [(end + j, token, weight) for j, token in enumerate(target)]))
        kl = subject_row(model, KL_TEMPLATE, fact.subject)
        # only the subject's last token of "{} is a" matters: its next-token distribution is compared
        rows.append(_Row(kl.ids[: kl.lookup + 1], kl.lookup, r, kl=True))
    n_keep = 0
    for r, (fact, group) in enumerate(zip(requests, keep_templates or [])):
        for template in group:
            row = subject_row(model, template, fact.subject)
            rows.append(_Row(row.ids, row.lookup, r, keep=n_keep))
            n_keep += 1
    return rows, bare


class _Group:
    """Rows with one suffix length: cached prefix, recorded block calls and the suffix after ``layer``."""

    def __init__(self, model, rows: list[_Row], layer: int) -> None:
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        device = input_device(model)
        width = 1 + max(r.lookup for r in rows)  # >= 1 column so every row has a (masked) prefix
        prefix = [[pad] * (width - r.lookup) + list(r.ids[: r.lookup]) for r in rows]
        suffix = [list(r.ids[r.lookup:]) for r in rows]
        mask = [[0] * (width - r.lookup) + [1] * len(r.ids) for r in rows]
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        prefix_t, suffix_t, mask_t = as_long(prefix), as_long(suffix), as_long(mask)
        _, self.prefix_kv = filled_cache(model, prefix_t, attention_mask=mask_t[:, :width])
        self.hook = ModelAdapter.resid_out(layer)
        self.calls: BlockCalls = capture_block_calls(model, suffix_t, self.prefix_kv, attention_mask=mask_t,
                                                     keep=[self.hook])
        self.rows = rows
        self.request = as_long([r.request for r in rows])
        self.layer = layer
        self.device = device
        self._active: torch.Tensor | None = None

    def base_state(self, row: int) -> torch.Tensor:
        """The unshifted hidden state after ``layer`` at the subject's last token of one row."""
        return self.calls.kept[self.hook][row, 0]

    def select(self, active_requests: torch.Tensor) -> bool:
        """Keep only rows of active requests; returns False when none is left."""
        rows = torch.nonzero(active_requests[self.request]).flatten()
        if len(rows) == 0:
            return False
        if self._active is None or not torch.equal(self._active, rows):
            self._active = rows
            self._calls = self.calls.select_rows(rows)
            self._kv = [(k[rows], v[rows]) for k, v in self.prefix_kv]
            kept = [self.rows[i] for i in rows.tolist()]
            self._request = self.request[rows]
            spec = [(i, pos, tok, w, r.request) for i, r in enumerate(kept) for pos, tok, w in r.targets]
            self._target_rows = torch.tensor([s[0] for s in spec], dtype=torch.long, device=self.device)
            self._target_positions = torch.tensor([s[1] for s in spec], dtype=torch.long, device=self.device)
            self._target_tokens = torch.tensor([s[2] for s in spec], dtype=torch.long, device=self.device)
            self._target_weights = torch.tensor([s[3] for s in spec], device=self.device)
            self._target_requests = torch.tensor([s[4] for s in spec], dtype=torch.long, device=self.device)
            self._kl_rows = torch.tensor([i for i, r in enumerate(kept) if r.kl], dtype=torch.long, device=self.device)
            keep = [(i, r.keep) for i, r in enumerate(kept) if r.keep is not None]
            self._keep_rows = torch.tensor([i for i, _ in keep], dtype=torch.long, device=self.device)
            self._keep_index = torch.tensor([k for _, k in keep], dtype=torch.long, device=self.device)
        return True

    def forward(self, model, delta: torch.Tensor, n_requests: int):
        """Per-request summed weighted NLL, the KL rows' (requests, log-probs) or None, and the keep rows'
        (keep indices, requests, log-probs after their last token) or None, for the active rows with δ."""
        base = self._calls.kept[self.hook]
        shifted = base[:, :1] + delta[self._request][:, None].to(base.device, base.dtype)
        hidden = torch.cat([shifted, base[:, 1:]], dim=1)
        for block in range(self.layer + 1, len(model.blocks)):
            keys, values = self._kv[block]
            hidden = call_block(model, block, hidden, self._calls.arguments[block], keys, values)
        hidden = hidden.to(self.device)  # the last block's GPU under a device map; the indices live here
        nll = torch.zeros(n_requests, device=self.device)
        if len(self._target_rows):
            logits = logits_of(model, hidden[self._target_rows, self._target_positions])
            log_probs = torch.log_softmax(logits.float(), -1)
            token_nll = -log_probs.gather(1, self._target_tokens[:, None])[:, 0] * self._target_weights
            nll = nll.index_add(0, self._target_requests, token_nll)
        kl = None
        if len(self._kl_rows):
            kl_logits = logits_of(model, hidden[self._kl_rows, 0])
            kl = (self._request[self._kl_rows], torch.log_softmax(kl_logits.float(), -1))
        keep = None
        if len(self._keep_rows):
            keep_logits = logits_of(model, hidden[self._keep_rows, -1])
            keep = (self._keep_index, self._request[self._keep_rows], torch.log_softmax(keep_logits.float(), -1))
        return nll, kl, keep


def compute_targets(model, requests: Sequence[Fact], layer: int, templates: list[list[str]],
                    config: TargetConfig = TargetConfig(), show_progress: bool = True,
                    keep_templates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    """(n, d_model) target vectors z = z0 + δ for the residual stream after ``layer``. The progress bar
    counts optimisation steps (a batch that stops early skips its remaining ones), so it has an ETA even
    for a single batch. ``keep_templates``: per request, templates (``{}``: its subject) whose next-token
    distributions δ must leave alone (module docstring)."""
    if keep_templates is not None and len(keep_templates) != len(requests):
        raise ValueError(f"keep_templates has {len(keep_templates)} entries for {len(requests)} requests")
    for fact, group in zip(requests, keep_templates or []):
        for template in group:
            if template.count(SLOT) != 1:
                raise ValueError(f"keep template {template!r} for {fact.subject!r} needs exactly one '{{}}' slot")
    targets = []
    starts = range(0, len(requests), config.batch_requests)
    with tqdm(total=len(starts) * config.steps, desc="target vectors", unit="step", disable=not show_progress,
              leave=False) as bar:
        for start in starts:
            batch = requests[start: start + config.batch_requests]
            keep = None if keep_templates is None else keep_templates[start: start + config.batch_requests]
            targets.append(_optimise(model, batch, layer, templates, config, bar.update, keep))
            bar.update((len(targets) * config.steps) - bar.n)  # the steps an early stop skipped
    return torch.cat(targets)


def _autocast(device: torch.device, dtype: str | None):
    """Autocast to ``dtype`` on ``device``'s kind, or nothing for None."""
    if dtype is None:
        return nullcontext()
    warn_if_slower(device.type, dtype)
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@contextmanager
def frozen_weights(model):
    """Turn off gradients for every model weight for the duration (only δ is trained), then restore."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _optimise(model, requests: Sequence[Fact], layer: int, templates: list[list[str]],
              config: TargetConfig, step_done: Callable[[int], object] = lambda n: None,
              keep_templates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    with frozen_weights(model):
        return _optimise_frozen(model, requests, layer, templates, config, step_done, keep_templates)


def _optimise_frozen(model, requests: Sequence[Fact], layer: int, templates: list[list[str]],
                     config: TargetConfig, step_done: Callable[[int], object],
                     keep_templates: Sequence[Sequence[str]] | None) -> torch.Tensor:
    rows, bare = _rows_for(model, requests, templates, keep_templates)
    keeps_per_request = torch.tensor([float(len(group)) for group in keep_templates or [[]] * len(requests)])
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(row.suffix_length, []).append(i)
    groups, location = [], {}
    for indices in by_length.values():
        for position, i in enumerate(indices):
            location[i] = (len(groups), position)
        groups.append(_Group(model, [rows[i] for i in indices], layer))
    target_init = torch.stack([groups[location[i][0]].base_state(location[i][1]) for i in bare]).float()
    target_init = target_init.to(input_device(model))  # δ lives beside the requests' indices

    n = len(requests)
    device = target_init.device
    delta = torch.zeros_like(target_init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    kl_init: torch.Tensor | None = None
    keep_init: torch.Tensor | None = None  # (keep rows, vocabulary): their log-probs with δ = 0
    keep_weight = (config.keep_factor / keeps_per_request.clamp(min=1)).to(device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(config.steps):
        if step:
            step_done(1)
        optimizer.zero_grad()
        nll = torch.zeros(n, device=device)
        keep_kl = torch.zeros(n, device=device)
        kl_log_probs = None
        for group in groups:
            if not group.select(~done):
                continue
            with _autocast(device, config.autocast):
                group_nll, kl, keep = group.forward(model, delta, n)
            nll = nll + group_nll
            if keep is not None:
                index, owners, log_probs = keep
                if step == 0:
                    if keep_init is None:
                        keep_init = torch.zeros(int(keeps_per_request.sum()), log_probs.shape[-1], device=device)
                    keep_init[index] = log_probs.detach()
                row_kl = (log_probs.exp() * (log_probs - keep_init[index])).sum(-1)
                keep_kl = keep_kl.index_add(0, owners, row_kl)
            if kl is not None:
                if kl_log_probs is None:
                    kl_log_probs = torch.zeros(n, kl[1].shape[-1], device=device)
                kl_log_probs = kl_log_probs.index_copy(0, kl[0], kl[1])
        if kl_init is None:
            kl_init = kl_log_probs.detach()
        kl_div = (kl_log_probs.exp() * (kl_log_probs - kl_init)).sum(-1)  # KL(current || initial)
        decay = config.weight_decay * delta.norm(dim=1) / target_init.norm(dim=1) ** 2
        loss = torch.where(done, torch.zeros_like(nll), nll + config.kl_factor * kl_div + decay
                           + keep_weight * keep_kl)
        done = done | (loss.detach() < config.loss_threshold)
        if bool(done.all()) or step == config.steps - 1:
            break
        kept = delta.detach().clone()
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            max_norm = config.clamp_norm_factor * target_init.norm(dim=1, keepdim=True)
            norms = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
            delta[done] = kept[done]  # finished requests keep the δ that met the threshold
    return target_init + delta.detach()
