"""The WISE editor: side memories on one model, behind routing hooks, trained one edit call at a time.

The model's weights never change: hooks at the side layer add the chosen memory's change to the
down-projection's output, so :meth:`WiseEditor.detach` gives back the unedited model bit for bit. Edit
rows are recorded once with the main memory and each training step replays only the later blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from editing.contexts import context_templates
from editing.editor import Editor, as_facts
from editing.prompts import in_context, subject_row
from editing.relation_keys import RelationKeys, running_best, unedited_states
from editing.requests import validate_requests
from editing.subject_spellings import subject_spellings, word_continuations
from editing.targets import frozen_weights
from editing.weights import weight_fingerprint
from editing.wise.calibration import FloorCalibrator
from editing.wise.config import WiseConfig
from editing.wise.easyedit import WiseEasyEditConfig
from editing.wise.memory import (SideMemory, finite_or_none, inf_if_none, memory_from_record, memory_record,
                                 merge_shards, new_shard, to_saved)
from editing.wise.negatives import NegativeSampler, prompt_pools, unrelated_texts
from editing.wise.relations import Relations
from editing.wise.subject_gate import SubjectGate, memory_owners
from editing.wise.routing import (Routing, activation_scores, common_directions, decide, hinge_mean, masked_mean,
                                  real_positions, routed_output, row_score, running_score, valid_mask, without_common)
from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.blocks import BlockCalls, logits_of, record_rows, replay_later_blocks
from tracing.engine import require_full_forwards
from tracing.candidates import relation_subjects, relation_templates, unused_fact_prompts
from tracing.facts import SLOT, Fact, encode_fact, evaluated_prompts
from tracing.hooks import add_permanent_hooks, remove_hooks
from tracing.io import load_tensors, save_tensors_atomic
from tracing.models import model_spec
from tracing.noise import default_noise_std, sample_noise
from tracing.state import state_of
from tracing.tokens import encode, right_padded, target_token_ids


RELATION_CENTRE_PROMPTS = 256  # held-out fact prompts whose last-token mean centres the relation keys


@dataclass
class EditResult:
    """How one call of :meth:`WiseEditor.edit` went."""

    n_facts: int
    steps: int
    loss: float
    in_scores: list[float]  # per fact: mean in-scope score over its rows at the end
    out_score: float  # largest score over the unrelated rows at the end
    seconds: float
    memory_sizes: list[int] = field(default_factory=list)  # edits per memory after this call


@dataclass
class _Batch:
    """The fixed part of one edit's training rows, computed once with the main memory."""

    keys: torch.Tensor  # (R, S, d_mlp) down-projection inputs, float32
    hidden: torch.Tensor  # (R, S, d_model) residual stream after the side layer, in the model's dtype
    valid: torch.Tensor  # (R, S) real tokens
    decision: torch.Tensor  # (R, S) positions that predict a target token
    fact: torch.Tensor  # (R,) which request a row belongs to
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    target_tokens: torch.Tensor
    target_weights: torch.Tensor  # 1 / (tokens of the row's target x rows per fact)
    calls: BlockCalls  # recorded arguments of the blocks after the side layer
    unrelated_keys: torch.Tensor  # (J, S', d_mlp)
    unrelated_valid: torch.Tensor  # (J, S')
    replay_keys: torch.Tensor  # (P, S'', d_mlp): bare rows of earlier edits in this shard
    replay_valid: torch.Tensor
    replay_decision: torch.Tensor
    acts: torch.Tensor | None = None  # (R, S) where Δ acts on the edit rows (None: every position)


@dataclass
class _Call:
    """What the routing hook needs from the current call into the model: padding mask, cache length."""

    mask: torch.Tensor | None
    past: int


class WiseEditor(Editor):
    """WISE side memories for one model, routed through TransformerBridge hooks.

    >>> editor = WiseEditor(WiseConfig()).attach(model)
    >>> editor.edit(fact)                    # a fact (or a small list) with target_new; edits accumulate
    >>> editor.route(["The Eiffel Tower is located in"])   # which memory a prompt would use, and why
    >>> editor.save("wise.safetensors")
    >>> editor.detach()                      # the model is exactly the unedited one again
    """

    method = "wise"
    routes = True

    def __init__(self, config: WiseConfig = WiseConfig(), negatives: Sequence[str] | None = None,
                 calibration: Sequence[str] | None = None,
                 templates: Mapping[str, Sequence[str]] | None = None,
                 subjects: Mapping[str, Sequence[str]] | None = None) -> None:
        """``negatives``: fact-shaped prompts about subjects that will not be edited, which the router is
        trained to leave on the main memory; ``calibration``: more such prompts, never trained on, whose
        scores floor each memory's threshold. None: ``config.negatives`` / ``config.calibration`` disjoint
        draws from the bundled :func:`tracing.candidates.unused_fact_prompts`, which no evaluation of the
        bundled facts reads. ``templates``: per relation id, prompt templates (``{}`` for the subject) from
        which each edit's subject negatives are built, in the relations other than its own (None: the
        bundled :func:`tracing.candidates.relation_templates`); ``subjects``: per relation id, subjects whose
        prompts in that relation are the relation negatives of its edits (None: the bundled candidates')."""
        self.config = config
        self.method = config.method  # "wise", or "wise-easyedit" for EasyEdit's preset
        self.relations = Relations(
            {r: tuple(t) for r, t in (relation_templates() if templates is None else templates).items()})
        self.subjects = {r: tuple(t) for r, t in (relation_subjects() if subjects is None else subjects).items()}
        self.negative_prompts: list[str] | None = None if negatives is None else list(negatives)
        self.calibration_prompts: list[str] | None = None if calibration is None else list(calibration)
        self.model = None
        self.layer: int | None = None
        self.model_name: str | None = None
        self.base_fingerprint: str | None = None  # of the main down-projection the memories belong to
        self.stored: list[SideMemory] = []  # finished shards / merged memories
        self.current: SideMemory | None = None  # the shard being edited
        self.mask: torch.Tensor | None = None  # its trainable entries
        self.merged = False  # WISE-Merge: stored[0] is the merged memory
        self.saved_shards = 0
        self.global_min_act = math.inf
        self.n_edits = 0
        self.requests: list[Fact] = []
        self.spellings: list[list[tuple[int, ...]]] = []  # per request: its subject's token-id spellings
        self._hook_handles: list = []  # (hook point, LensHandle) of the routing hooks
        self._call_handles: list = []  # pre/post hooks on the Hugging Face model
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # stacked deltas, thresholds
        self._key: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None  # token ids of the forward in progress (the subject gate)
        self._history: torch.Tensor | None = None  # token ids of the rows so far, for a KV-cached continuation
        self._gate: SubjectGate | None = None
        self._call: _Call | None = None
        self._carry: torch.Tensor | None = None
        self._routing_on = True
        self._contexts: list[str] = []
        self._unrelated: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid
        self._negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid of negative_prompts
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, valid of calibration_prompts
        self._reserved: set[str] = set()  # prompts never trained on: evaluations' and the calibration's
        self._calibration_rows: list[list[int]] = []  # token ids of calibration_prompts
        self.common: torch.Tensor | None = None  # (d_mlp, r) orthonormal directions shared by generic keys
        self.relation: RelationKeys | None = None  # the relation check's keys (relation_similarity set)
        self._relation_states: torch.Tensor | None = None  # the relation layer's residual, forward in progress
        self._relation_history: torch.Tensor | None = None  # ... of the rows so far (KV-cached continuation)
        self._calibration_relation: torch.Tensor | None = None  # ... of the calibration rows

    # --- inspection ---------------------------------------------------------------------------------
    @property
    def templates(self) -> Mapping[str, tuple[str, ...]]:
        """Per relation id, the prompt templates negatives and the calibration scope are told from."""
        return self.relations.templates

    @property
    def facts(self) -> list[Fact]:
        """Every fact edited, in order."""
        return list(self.requests)

    @property
    def memories(self) -> list[SideMemory]:
        """The memories the router chooses from: the stored ones (in WISE-Merge, the merged memory and the
        shards waiting for the next merge), then the current shard once it holds an edit."""
        current = [self.current] if self.current is not None and self.current.n_edits else []
        return self.stored + current

    def thresholds(self) -> list[float]:
        """Per memory: inputs scoring above this are routed to it."""
        ratio = self.config.act_ratio
        if self.config.retrieve:
            return [max(m.min_act * ratio, m.floor) for m in self.memories]
        return [max(self.global_min_act * ratio, m.floor) for m in self.memories]

    @property
    def negative_sampler(self) -> NegativeSampler:
        """Draws each edit call's negatives from this editor's prompts, under its current config."""
        return NegativeSampler(self.negative_prompts or [], self._negatives, self.relations, self.subjects,
                               self.calibration_prompts or [], self._reserved, self.config)

    @property
    def calibrator(self) -> FloorCalibrator:
        """Sets the memories' threshold floors from this editor's calibration prompts, under its config."""
        eligible = None
        if self._gated:
            if self.relation is not None and self._calibration_relation is None and self._calibration_rows:
                self._calibration_relation = unedited_states(self.model, self._calibration_rows, self.relation.layer)
            passes = self._relation_passes(self._calibration_relation)
            eligible = self._subject_gate().reaches(self._calibration_rows, passes)
        return FloorCalibrator(self.calibration_prompts or [], self._calibration, self.relations, self.config,
                               eligible)

    @property
    def _gated(self) -> bool:
        return self.config.route_match == "subject"

    def _subject_gate(self) -> SubjectGate:
        """Which memories a prompt may reach under ``route_match="subject"`` (rebuilt after every edit)."""
        if self._gate is None:
            memories = self.memories
            self._gate = SubjectGate(self.spellings, memory_owners([m.n_edits for m in memories]), len(memories),
                                     word_continuations(self.model.tokenizer))
        return self._gate

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> list[Routing]:
        """Scores and routing decision at the last token of each prompt, exactly as the hook decides."""
        model = self._attached()
        if not self.memories:
            return [Routing(p, None, [], []) for p in prompts]
        rows = [encode(model, p) for p in prompts]
        relation: dict[str, torch.Tensor] = {}  # the relation layer's residual, read in the keys' forward as the hook

        def keep_relation(states: torch.Tensor, hook) -> None:
            relation["states"] = states.detach()

        hooks = [] if self.relation is None else [(ModelAdapter.resid_out(self.relation.layer), keep_relation)]
        keys = self._keys(model, rows, hooks)
        gate = None
        if self._gated:
            gate = self._subject_gate().eligible(rows, keys.shape[1], keys.device,
                                                 self._relation_passes(relation.get("states")))
        statistic, choice, _, _ = decide(keys, valid_mask(rows, keys.device), *self._routing_table(),
                                         self.config.score, choose=self.config.choose, gate=gate)
        index, last = torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])
        scores, chosen = statistic[:, index, last], choice[index, last]
        allowed = gate[:, index, last] if gate is not None else None
        return [Routing(p, int(chosen[i]) if chosen[i] >= 0 else None, scores[:, i].tolist(), self.thresholds(),
                        [] if allowed is None else allowed[:, i].tolist())
                for i, p in enumerate(prompts)]

    # --- attach / detach ----------------------------------------------------------------------------
    def attach(self, model) -> "WiseEditor":
        """Install the routing hooks on ``model``; its weights are never changed."""
        if self.model is not None:
            raise RuntimeError("this editor is already attached; detach it first")
        if state_of(model).attached.get("wise") is not None:
            raise RuntimeError("another WiseEditor is attached to this model; detach it first")
        adapter = ModelAdapter.of(model)
        layer = self.config.resolved_layer(adapter.n_layers)
        if self.layer is not None and layer != self.layer:
            raise ValueError(f"these memories belong to layer {self.layer}, the config says {layer}")
        weight = adapter.down_projection(model, layer)
        fingerprint = weight_fingerprint(weight)
        if self.base_fingerprint is not None and fingerprint != self.base_fingerprint:
            raise ValueError(f"the layer-{layer} down-projection differs from the one these memories were made "
                             f"for (on {self.model_name!r})")
        self.layer, self.base_fingerprint, self.model_name = layer, fingerprint, model_spec(model).name
        if self.current is None:
            self._start_shard((adapter.d_model, adapter.d_mlp))
        self._move_to(weight.device)
        self._prepare_rows(model)  # samples text, so before any routing hook is in place
        self.spellings += [subject_spellings(model, fact, self._contexts)  # a file saved without them
                           for fact in self.requests[len(self.spellings):]]
        self._prepare_relation(model, adapter.n_layers)
        self._install(model)
        return self

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it computed before :meth:`attach`."""
        model = self._attached()
        remove_hooks(self._hook_handles)
        for handle in self._call_handles:
            handle.remove()
        self._hook_handles, self._call_handles = [], []
        state_of(model).attached.pop("wise", None)
        require_full_forwards(model, "wise", False)
        self.model, self._call, self._carry, self._key = None, None, None, None
        self._tokens, self._history, self._gate = None, None, None
        self._relation_states, self._relation_history, self._calibration_relation = None, None, None

    def undo(self) -> None:
        """The unedited model again (:meth:`detach`; the memories stay in this object)."""
        if self.model is not None:
            self.detach()

    def _install(self, model) -> None:
        """Permanent hooks (they survive ``model.reset_hooks()``), first in line at their hook points."""
        hooks = [(ModelAdapter.token_ids, self._keep_tokens), (ModelAdapter.mlp_key(self.layer), self._keep_key),
                 (ModelAdapter.mlp_value(self.layer), self._route_output)]
        if self.relation is not None:
            hooks.append((ModelAdapter.resid_out(self.relation.layer), self._keep_relation_states))
        self._hook_handles = add_permanent_hooks(model, hooks)
        hf_model = model.original_model
        self._call_handles = [hf_model.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                              hf_model.register_forward_hook(self._end_call)]
        state_of(model).attached["wise"] = self
        require_full_forwards(model, "wise", True)  # routing reads the whole prefix: no suffix-only tracing
        self.model, self._table, self._carry, self._gate = model, None, None, None

    def _attached(self):
        if self.model is None:
            raise RuntimeError("attach the editor to a model first")
        return self.model

    # --- hooks --------------------------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs) -> None:
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        self._call = _Call(mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None, past)

    def _end_call(self, module, args, output) -> None:
        self._call = None

    def _keep_tokens(self, tokens: torch.Tensor, hook) -> None:
        self._tokens = tokens

    def _keep_key(self, key: torch.Tensor, hook) -> None:
        self._key = key

    def _keep_relation_states(self, states: torch.Tensor, hook) -> None:
        self._relation_states = states

    def _route_output(self, value: torch.Tensor, hook) -> torch.Tensor | None:
        key, self._key = self._key, None
        tokens, self._tokens = self._tokens, None  # read once: a later call without embedding gets none
        states, self._relation_states = self._relation_states, None
        if not self._routing_on or key is None or not self.memories:
            return None
        key = self._specific(key)
        call = self._call or _Call(None, 0)
        fits = self._carry is not None and tuple(self._carry.shape[1:]) == (len(self.memories), key.shape[0])
        carry = self._carry if call.past > 0 and fits else None
        gate = self._gate_of_call(tokens, states, key, call) if self._gated else None
        _, choice, change, self._carry = decide(key, real_positions(call.mask, key), *self._routing_table(),
                                                self.config.score, carry, self.config.choose, gate)
        return routed_output(value, choice, change)

    def _gate_of_call(self, tokens: torch.Tensor | None, states: torch.Tensor | None, key: torch.Tensor,
                      call: _Call) -> torch.Tensor:
        """The subject gate (memories, b, s) at this call's positions; ``states``: the relation layer's
        residual in this call (the relation check). A KV-cached call continues the token rows (and states)
        of the calls before it (a spelling may straddle the two); a call whose token ids were not seen
        (states fed to a block directly) reaches no memory."""
        batch, length = key.shape[:2]
        if tokens is None or tuple(tokens.shape) != (batch, length):
            self._history = None
            return torch.zeros(len(self.memories), batch, length, dtype=torch.bool, device=key.device)
        history = self._history
        if call.past > 0 and history is not None and tuple(history.shape) == (batch, call.past):
            tokens = torch.cat([history, tokens.to(history.device)], 1)
            if states is not None and self._relation_history is not None:
                states = torch.cat([self._relation_history, states.to(self._relation_history.device)], 1)
        self._history, self._relation_history = tokens, states
        if self.relation is not None and (states is None or states.shape[1] != tokens.shape[1]):
            return torch.zeros(len(self.memories), batch, length, dtype=torch.bool, device=key.device)
        passes = self._relation_passes(states)
        return self._subject_gate().eligible(tokens.tolist(), device=key.device, passes=passes)[..., -length:]

    def _relation_passes(self, states: torch.Tensor | None):
        """The relation check over rows whose residual at the relation layer is ``states`` (rows, width,
        d_model): a match may answer from the first later position at least ``relation_similarity`` similar
        to its edit's relation key (:func:`editing.relation_keys.running_best`). None when it is off."""
        if self.relation is None:
            return None
        threshold = self.config.relation_similarity

        def passes(rows: torch.Tensor, positions: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
            device = states.device
            similarity = self.relation.similarity(states[rows.to(device)], edits.to(device))
            return running_best(similarity, positions.to(device)) >= threshold

        return passes

    @torch.no_grad()
    def _prepare_relation(self, model, n_layers: int) -> None:
        """The relation check's centre and keys at the configured layer (made again for every edit when a
        file brings none, or keys of another layer)."""
        if self.config.relation_similarity is None:
            self.relation = None
            return
        layer = self.config.resolved_relation_layer(n_layers)
        if self.relation is None or self.relation.layer != layer:
            prompts = unused_fact_prompts(self.config.seed)[:RELATION_CENTRE_PROMPTS]
            self.relation = RelationKeys.calibrated(model, layer, prompts)
        if len(self.relation) != len(self.requests):
            self.relation.keys = self.relation.make(model, self.requests, self._contexts) if self.requests else None

    def _routing_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memories' stacked deltas and thresholds (rebuilt after every edit)."""
        if self._table is None:
            deltas = torch.stack([m.delta for m in self.memories])
            self._table = deltas, torch.tensor(self.thresholds(), dtype=deltas.dtype, device=deltas.device)
        return self._table

    # --- editing ------------------------------------------------------------------------------------
    def edit(self, facts: Fact | Sequence[Fact], show_progress: bool = False) -> EditResult:
        """Write one fact (or a small batch, edited together) into the current side memory."""
        model = self._attached()
        facts = validate_requests(model, as_facts(facts), earlier=self.requests)
        start = time.perf_counter()
        self._routing_on = False  # rows are recorded with the main memory; training adds Δ itself
        try:
            with frozen_weights(model):
                batch = self._batch(model, facts)
                steps, loss = self._train(model, batch, show_progress)
                in_scores, out_score = self._final_scores(batch)
        finally:
            self._routing_on = True
        self._record(facts, in_scores)
        return EditResult(len(facts), steps, loss, in_scores, out_score, time.perf_counter() - start,
                          [m.n_edits for m in self.memories])

    def _record(self, facts: list[Fact], in_scores: list[float]) -> None:
        self.current.min_act = min(self.current.min_act, *in_scores)
        self.global_min_act = min(self.global_min_act, *in_scores)
        self.current.n_edits += len(facts)
        self.current.in_scores += in_scores
        self.n_edits += len(facts)
        self.requests += facts
        self.spellings += [subject_spellings(self.model, fact, self._contexts) for fact in facts]
        if self.relation is not None:
            self.relation.add(self.relation.make(self.model, facts, self._contexts))
        if self.current.n_edits >= self.config.save_freq:
            self._save_shard()
        self._gate = None
        self.calibrator.refresh(self.memories, self.requests)
        self._table, self._carry = None, None

    def _start_shard(self, shape: tuple[int, ...]) -> None:
        self.current, self.mask = new_shard(shape, self.config.mask_ratio, self.config.seed, self.n_edits)

    def _save_shard(self) -> None:
        device = self.current.delta.device
        self.stored.append(self.current)
        self.saved_shards += 1
        self._start_shard(tuple(self.current.delta.shape))
        self._move_to(device)
        per_merge = self.config.merge_freq // self.config.save_freq
        if per_merge and self.saved_shards % per_merge == 0:
            self.stored, self.merged = merge_shards(self.stored, per_merge, self.config.retrieve, self.merged,
                                                    self.config.density)

    # --- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch(self, model, facts: list[Fact]) -> _Batch:
        """Training rows: each request's prompt in every context template followed by its target (teacher
        forcing), recorded once with the main memory, and the unrelated rows."""
        rows, decisions, targets, owners, prefixes, subject_ends = [], [], [], [], [], []
        for f, fact in enumerate(facts):
            target = target_token_ids(model, fact.target_new)
            for context in self._contexts:
                prompt = subject_row(model, in_context(context, fact.template), fact.subject)
                rows.append(list(prompt.ids) + target[:-1])
                decisions.append(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
                targets.append(target)
                owners.append(f)
                prefixes.append(min(prompt.lookup + 1, len(prompt) - 1))
                subject_ends.append(prompt.lookup)
        recorded = record_rows(model, right_padded(model, rows), self.layer)
        keys, device = self._specific(recorded.keys), recorded.keys.device
        decision = torch.zeros(keys.shape[:2], dtype=torch.bool, device=device)
        spec = []
        for r, (positions, target) in enumerate(zip(decisions, targets)):
            decision[r, list(positions)[: self._scored_positions(len(positions))]] = True
            spec += [(r, p, t, 1.0 / len(target) / len(self._contexts)) for p, t in zip(positions, target)]
        target_rows, target_positions, target_tokens, target_weights = zip(*spec)
        long = functools.partial(torch.tensor, dtype=torch.long, device=device)
        groups = [self._unrelated, self._corrupted_subjects(model, facts),
                  self.negative_sampler.pool_rows(facts, self.n_edits), self._fact_negative_rows(model, facts)]
        if self.config.subject_prefix:  # the subject alone (and what precedes it) must not route
            width = keys.shape[1]
            groups.append((keys, torch.arange(width, device=device)[None, :] < torch.tensor(prefixes, device=device)[:, None]))
        unrelated = _stack_padded(groups)
        acts = None
        if self._gated and self.config.train_from_subject:  # as the gate lets Δ act at inference
            ends = torch.tensor(subject_ends, device=device)
            acts = torch.arange(keys.shape[1], device=device)[None, :] >= ends[:, None]
        return _Batch(keys, recorded.hidden, valid_mask(rows, device), decision, long(owners), long(target_rows),
                      long(target_positions), long(target_tokens), torch.tensor(target_weights, device=device),
                      recorded.calls, *unrelated, *self._replay_rows(model), acts=acts)

    @torch.no_grad()
    def _replay_rows(self, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys of up to ``replay`` earlier edits of the current shard (bare prompt + target), whose
        routing scores the new edit must not push below the shard's recorded minimum."""
        earlier = self.requests[len(self.requests) - self.current.n_edits:]
        chosen = random.Random(self.config.seed + self.n_edits).sample(earlier, min(self.config.replay, len(earlier)))
        rows, decisions = [], []
        for fact in chosen:
            prompt, target = encode(model, fact.prompt), target_token_ids(model, fact.target_new)
            rows.append(prompt + target[:-1])
            decisions.append((len(prompt) - 1, len(prompt) - 1 + len(target)))
        if not rows:
            empty = self._unrelated[0][:0]
            return empty, empty[..., 0].bool(), empty[..., 0].bool()
        keys = self._keys(model, rows)
        decision = torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
        for r, (start, end) in enumerate(decisions):
            decision[r, start: start + self._scored_positions(end - start)] = True
        return keys, valid_mask(rows, keys.device), decision

    def _train(self, model, batch: _Batch, show_progress: bool) -> tuple[int, float]:
        config = self.config
        delta = self.current.delta.clone().requires_grad_(True)
        mask = self.mask.to(delta.dtype)
        main = self._main_weight(model, delta) if config.weight_decay else None
        previous, value, step = math.inf, math.inf, 0
        for step in range(config.n_iter):
            parts = self._loss(model, batch, delta)
            loss = sum(parts.values())
            value = float(loss.detach())
            if show_progress:
                terms = ", ".join(f"{name} {float(term.detach()):.3f}" for name, term in parts.items())
                print(f"step {step:3d} loss {value:.3f} ({terms})")
            if value <= config.stop_loss and abs(previous - value) <= config.stop_change:
                break
            previous = value
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                update = config.edit_lr * grad * mask
                if main is not None:  # EasyEdit's SGD decays the side weight W + Δ, after the mask
                    update = update + config.edit_lr * config.weight_decay * (main + delta)
                delta.sub_(update)
                delta.clamp_(-config.norm_constraint, config.norm_constraint)
        self.current.delta = delta.detach()
        self.current.calibration_scores = None
        return step + 1, value

    def _main_weight(self, model, delta: torch.Tensor) -> torch.Tensor:
        """The main down-projection W as (d_model, d_mlp), like Δ: weight decay shrinks the side weight
        W + Δ, every entry, so it pulls Δ towards -W."""
        return ModelAdapter.of(model).read_down_projection(model, self.layer).to(delta.device, delta.dtype)

    def _loss(self, model, batch: _Batch, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the new targets plus the three routing margins, every row through Δ. The edit
        rows' terms are averaged over each fact's contexts and summed over the facts of the call, so a fact
        edited in a batch learns as fast as one edited alone (with the mean over a batch of 10, one call
        of 40 steps left the new targets' NLL at 3.0 per fact; summed, 0.19 after 25 steps)."""
        config = self.config
        change = batch.keys @ delta.T
        acting = change if batch.acts is None else change * batch.acts[..., None]
        final = replay_later_blocks(model, self.layer, batch.calls, batch.hidden + acting.to(batch.hidden.dtype))
        final = final.to(batch.target_rows.device)  # the last block's GPU under a device map
        logits = logits_of(model, final[batch.target_rows, batch.target_positions])
        nll = -torch.log_softmax(logits.float(), -1).gather(1, batch.target_tokens[:, None])[:, 0]
        in_rows = self._in_scores(torch.linalg.vector_norm(change, dim=-1), batch.valid, batch.decision)  # (R,)
        out_rows = row_score(activation_scores(batch.unrelated_keys, delta), batch.unrelated_valid, config.score)
        return {"nll": (nll * batch.target_weights).sum(), **self._margins(in_rows, out_rows, batch.fact),
                "replay": self._replay_loss(batch, delta)}

    def _margins(self, in_rows: torch.Tensor, out_rows: torch.Tensor, fact: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three routing margins on the edit rows' scores ``in_rows`` (R,) (``fact``: whose row) and the
        unrelated rows' ``out_rows`` (J,), each hinge averaged per fact and summed over the facts.
        ``margin_mean="violated"`` averages only over the entries that violate the margin (EasyEdit)."""
        config = self.config
        below_alpha = torch.relu(out_rows - config.alpha)
        above_beta = torch.relu(config.beta - in_rows)
        gap = torch.relu(out_rows[None, :] - in_rows[:, None] + config.gamma)  # (R, J)
        if config.margin_mean == "violated":
            facts = range(int(fact.max()) + 1)
            return {"below_alpha": hinge_mean(below_alpha, True),
                    "above_beta": sum(hinge_mean(above_beta[fact == f], True) for f in facts),
                    "gap": sum(hinge_mean(gap[fact == f], True) for f in facts)}
        return {"below_alpha": below_alpha.mean(), "above_beta": above_beta.sum() / len(self._contexts),
                "gap": gap.mean(1).sum() / len(self._contexts)}

    def _replay_loss(self, batch: _Batch, delta: torch.Tensor) -> torch.Tensor:
        """ReLU(min_act - score) over the replayed earlier edits: keeps them above the shard's threshold."""
        if not len(batch.replay_keys) or not math.isfinite(self.current.min_act):
            return torch.zeros((), device=delta.device)
        scores = self._in_scores(activation_scores(batch.replay_keys, delta), batch.replay_valid, batch.replay_decision)
        return torch.relu(self.current.min_act - scores).mean()

    def _scored_positions(self, n_targets: int) -> int:
        """How many of a row's target-predicting positions the routing margins and thresholds read: only the
        first (the prompt alone, ``score_positions="prompt"``) or all of them (``"target"``)."""
        return 1 if self.config.score_positions == "prompt" else n_targets

    def _in_scores(self, scores: torch.Tensor, valid: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        """Per row: the routing statistic averaged over the positions that predict the target."""
        statistic, _ = running_score(scores, valid, self.config.score)
        return masked_mean(statistic, decision)

    @torch.no_grad()
    def _final_scores(self, batch: _Batch) -> tuple[list[float], float]:
        """Per request, the mean in-scope score over its rows (thresholds are learned from it), and the
        largest score over the unrelated rows."""
        delta = self.current.delta
        in_rows = self._in_scores(activation_scores(batch.keys, delta), batch.valid, batch.decision)
        per_fact = [float(in_rows[batch.fact == f].mean()) for f in range(int(batch.fact.max()) + 1)]
        out = row_score(activation_scores(batch.unrelated_keys, delta), batch.unrelated_valid, self.config.score)
        return per_fact, float(out.max())

    # --- context templates and unrelated rows ---------------------------------------------------------
    @torch.no_grad()
    def _prepare_rows(self, model) -> None:
        """MEMIT's context templates for the edit rows; model-written text and the bare contexts as the
        unrelated rows every edit shares; the keys of the negative and calibration prompts."""
        config = self.config
        groups = context_templates(model, config.context_prefixes, config.context_length, config.seed)
        self._contexts = [context for group in groups for context in group]
        texts = unrelated_texts(model, config.loc_prefixes, config.loc_length, config.seed)
        if config.bare_contexts:
            texts += [c.replace(SLOT, "").strip() for c in self._contexts if c != SLOT]
        keys, valid = self._prompt_keys(model, texts)
        self.negative_prompts, self.calibration_prompts = prompt_pools(config, self.negative_prompts,
                                                                       self.calibration_prompts)
        negatives = self._prompt_keys(model, self.negative_prompts)
        if self.common is None:  # a loaded editor brings its own
            last = negatives[0][torch.arange(len(negatives[1])), negatives[1].sum(1) - 1].to(keys.device)
            self.common = common_directions(torch.cat([keys[valid], last]), config.common_directions)
        self.common = self.common.to(keys.device)
        self._unrelated = self._specific(keys), valid
        self._negatives = self._specific(negatives[0]), negatives[1]
        calibration = self._prompt_keys(model, self.calibration_prompts)
        self._calibration = self._specific(calibration[0]), calibration[1]
        self._reserved = evaluated_prompts() | set(self.calibration_prompts)
        self._calibration_rows = [encode(model, prompt) for prompt in self.calibration_prompts]

    def _prompt_keys(self, model, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and valid mask of ``prompts`` (an empty pair for none)."""
        rows = [encode(model, prompt) for prompt in prompts]
        if not rows:
            d_mlp = ModelAdapter.of(model).d_mlp
            return torch.zeros(0, 1, d_mlp), torch.zeros(0, 1, dtype=torch.bool)
        keys = self._keys(model, rows, specific=False)
        return keys, valid_mask(rows, keys.device)

    @torch.no_grad()
    def _fact_negative_rows(self, model, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of the subject negatives and relation negatives of ``facts``: the side memory must answer to
        the fact, not to its subject or its relation alone."""
        prompts = self.negative_sampler.fact_prompts(facts, self.requests, self.n_edits)
        if not prompts:
            return self._unrelated[0][:0], self._unrelated[1][:0]
        rows = [encode(model, prompt) for prompt in prompts]
        keys = self._keys(model, rows)
        return keys, valid_mask(rows, keys.device)

    @torch.no_grad()
    def _corrupted_subjects(self, model, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of each edit prompt with its subject's embeddings drowned in Gaussian noise: the relation
        without a recognisable subject, which the side memory must not answer to."""
        samples = self.config.corrupted_samples
        rows, spans = [], []
        for fact in facts:
            encoded, span = encode_fact(model, fact)
            rows += [list(encoded.ids)] * samples
            spans += [span] * samples
        if not rows:
            return self._unrelated[0][:0], self._unrelated[1][:0]
        width = max(len(r) for r in rows)
        std = default_noise_std(model, self.config.noise_multiplier)
        noise = sample_noise(len(rows), width, ModelAdapter.of(model).d_model, std, self.config.seed + self.n_edits)
        on_subject = torch.zeros(len(rows), width, 1)
        for r, (start, end) in enumerate(spans):
            on_subject[r, start:end] = 1.0
        noise = noise * on_subject

        def corrupt(embeddings: torch.Tensor, hook) -> torch.Tensor:
            return embeddings + noise.to(embeddings.device, embeddings.dtype)

        keys = self._keys(model, rows, [(ModelAdapter.embed, corrupt)])
        return keys, valid_mask(rows, keys.device)

    def _keys(self, model, rows: list[list[int]], hooks=(), specific: bool = True) -> torch.Tensor:
        """Down-projection inputs at the side layer, (rows, longest row, d_mlp), right-padded; with
        ``specific``, without their components along :attr:`common`."""
        keys = activations_at(model, rows, ModelAdapter.mlp_key(self.layer), stop_at_layer=self.layer + 1,
                              hooks=hooks)
        return self._specific(keys) if specific else keys

    def _specific(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys without their components along the directions every input shares (:attr:`common`)."""
        return without_common(keys, self.common)

    def _move_to(self, device) -> None:
        for memory in self.stored + [self.current]:
            memory.delta = memory.delta.to(device)
        self.mask = self.mask.to(device)

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the side memories and the router state to one safetensors file, atomically."""
        if self.current is None:
            raise RuntimeError("nothing to save: attach the editor to a model first")
        tensors = {f"stored.{i}": to_saved(m.delta) for i, m in enumerate(self.stored)}
        tensors["current"] = to_saved(self.current.delta)
        tensors["mask"] = self.mask.to("cpu", torch.uint8).contiguous()
        if self.common is not None and self.common.numel():
            tensors["common"] = to_saved(self.common)
        if self.relation is not None and self.relation.keys is not None:
            tensors["relation_keys"] = self.relation.keys.contiguous()
            tensors["relation_centre"] = self.relation.centre.contiguous()
        meta = {
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "layer": self.layer,
            "model_name": self.model_name,
            "base_fingerprint": self.base_fingerprint,
            "memories": [memory_record(m) for m in self.stored + [self.current]],
            "merged": self.merged,
            "saved_shards": self.saved_shards,
            "global_min_act": finite_or_none(self.global_min_act),
            "n_edits": self.n_edits,
            "requests": [fact.to_counterfact() for fact in self.requests],
            "spellings": [[list(spelling) for spelling in entry] for entry in self.spellings],
            "negatives": self.negative_prompts,
            "calibration": self.calibration_prompts,
            "templates": self.templates,
            "subjects": self.subjects,
            "relation_layer": None if self.relation is None else self.relation.layer,
        }
        return save_tensors_atomic(path, tensors, "factlens_wise", meta)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "WiseEditor":
        """An editor holding the saved memories, not attached (``attach`` checks that they fit), or attached
        to ``model`` when one is given."""
        tensors, meta = load_tensors(path, "factlens_wise")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        config_class = WiseEasyEditConfig if meta.get("method") == WiseEasyEditConfig.method else WiseConfig
        editor = cls(config_class(**config), meta.get("negatives"), meta.get("calibration"), meta.get("templates"),
                     meta.get("subjects"))
        *stored, current = meta["memories"]
        editor.stored = [memory_from_record(tensors[f"stored.{i}"], r) for i, r in enumerate(stored)]
        editor.current = memory_from_record(tensors["current"], current)
        editor.mask = tensors["mask"].bool()
        editor.common = tensors.get("common")
        editor.layer, editor.model_name = meta["layer"], meta["model_name"]
        editor.base_fingerprint, editor.merged = meta["base_fingerprint"], meta["merged"]
        editor.saved_shards = meta["saved_shards"]
        editor.global_min_act = inf_if_none(meta["global_min_act"])
        editor.n_edits = meta["n_edits"]
        editor.requests = [Fact.from_counterfact(r) for r in meta["requests"]]
        editor.spellings = [[tuple(spelling) for spelling in entry] for entry in meta.get("spellings", [])]
        if "relation_keys" in tensors:
            editor.relation = RelationKeys(meta["relation_layer"], tensors["relation_centre"], tensors["relation_keys"])
        return editor if model is None else editor.attach(model)


def _stack_padded(groups: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate groups of right-padded (keys, valid) rows, padded to one width."""
    width = max(keys.shape[1] for keys, _ in groups)
    keys = torch.cat([torch.nn.functional.pad(k, (0, 0, 0, width - k.shape[1])) for k, _ in groups])
    valid = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for _, v in groups])
    return keys, valid
