"""GRACE (Hartvigsen et al., NeurIPS 2023): a key-value codebook at one layer, the lifelong-editing
baseline WISE is compared with.

An edit stores the down-projection input at the prompt's last token as a *key* with a deferral radius ε,
and trains a *value* that replaces the layer's output wherever an input's key lies within ε of its
nearest stored key. Nothing else changes, so locality is near perfect, and generalisation reaches only
keys inside a radius: the trade-off WISE's side memory is meant to improve on.

Codebook maintenance per edit, as EasyEdit's defaults (``eps_expand: coverage``): with d the distance to
the nearest stored key,

* no key yet, or ``d > eps_init + ε_nearest``: add a key with radius ``eps_init``;
* the nearest key holds another target: add a key and split the difference, both radii ``d / 2``;
* same target, ``d > ε_nearest``: grow the nearest radius to ``d`` and train its value further;
* same target, inside the radius: train its value further.

Differences from EasyEdit: a new value starts from the layer's current output at the key (EasyEdit draws
it from U[0, 1)); the replacement is checked at every position rather than at one token, so batches,
padding and cached generation need no bookkeeping; training reruns only the blocks after the layer; and a
value stops training once its loss is below ``stop_loss`` (0.02, WISE's stop), where GRACE runs all
``n_iter`` steps: on SmolLM2 an edit stops after about five of the 50 steps with its target learned,
ten times faster at the same scores (docs/grace.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from editing.editor import HookedEditor, Route, as_facts
from editing.requests import validate_requests
from editing.targets import frozen_weights
from editing.weights import weight_fingerprint
from editing.side_layer import default_layer
from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.blocks import logits_of, record_rows, replay_later_blocks
from tracing.facts import Fact
from tracing.hooks import add_permanent_hooks
from tracing.io import load_tensors, save_tensors_atomic
from tracing.placement import input_device
from tracing.tokens import encode, target_token_ids


@dataclass(frozen=True)
class GraceConfig:
    """EasyEdit's LLaMA-2-7B values (layer 27 of 32, which :func:`editing.wise.default_layer` reproduces),
    and an early stop (``stop_loss=0`` runs every step, as EasyEdit does).

    ``eps_init`` is a distance between d_mlp keys, so it depends on the model: on SmolLM2's layer 25 the
    last-token keys of different fact prompts are 17-33 apart (min, median over 12 facts) and a fact's key
    is 3-8 from its paraphrase's, so 1.0 admits only the edit prompt itself (GRACE's usual behaviour:
    high locality, no generalisation); about 5 would reach half the paraphrases.
    """

    layer: int | None = None
    eps_init: float = 1.0
    n_iter: int = 50
    edit_lr: float = 1.0  # Adam
    stop_loss: float = 0.02  # a value stops training once its loss is below this (0: all n_iter, as GRACE)


@dataclass
class GraceResult:
    """What one edit did to the codebook: ``action`` is "added", "split", "expanded" or "updated"."""

    entry: int
    action: str
    distance: float
    loss: float


class GraceEditor(HookedEditor):
    """A GRACE codebook for one model, applied through TransformerBridge hooks; ``detach`` (= ``undo``)
    restores the unedited model exactly, and ``attach`` puts the codebook back."""

    method = "grace"
    routes = True

    def __init__(self, config: GraceConfig = GraceConfig()) -> None:
        self.config = config
        self.model = None
        self.layer: int | None = None
        self.keys: torch.Tensor | None = None  # (N, d_mlp)
        self.values: torch.Tensor | None = None  # (N, d_model)
        self.radii: list[float] = []
        self.targets: list[str] = []
        self.edited: list[Fact] = []
        self.base_fingerprint: str | None = None  # of the layer's down-projection the codebook was made on
        self._handles: list = []
        self._key: torch.Tensor | None = None
        self._active = True

    def attach(self, model) -> "GraceEditor":
        if self.model is not None:
            raise RuntimeError("this editor is already attached; detach it first")
        n_layers = ModelAdapter.of(model).n_layers
        layer = default_layer(n_layers) if self.config.layer is None else self.config.layer
        if self.layer is not None and layer != self.layer:
            raise ValueError(f"this codebook belongs to layer {self.layer}, the config says {layer}")
        fingerprint = weight_fingerprint(ModelAdapter.down_projection(model, layer))
        if self.base_fingerprint is not None and fingerprint != self.base_fingerprint:
            raise ValueError(f"the layer-{layer} down-projection differs from the one this codebook was made for")
        self.layer, self.base_fingerprint = layer, fingerprint
        self._handles = add_permanent_hooks(model, [(ModelAdapter.mlp_key(self.layer), self._keep_key),
                                                    (ModelAdapter.mlp_value(self.layer), self._replace)])
        self.model = model
        return self

    def detach(self) -> None:
        super().detach()
        self._key = None

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """The codebook (keys, values, radii, labels) and the facts, atomically, fingerprinted."""
        if self.keys is None:
            raise RuntimeError("nothing to save: the codebook is empty")
        tensors = {"keys": self.keys.detach().cpu().contiguous(), "values": self.values.detach().cpu().contiguous()}
        meta = {"config": dataclasses.asdict(self.config), "layer": self.layer, "radii": self.radii,
                "targets": self.targets, "base_fingerprint": self.base_fingerprint,
                "facts": [fact.to_counterfact() for fact in self.edited]}
        return save_tensors_atomic(path, tensors, "factlens_grace", meta)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "GraceEditor":
        """The saved codebook; attached to ``model`` when given (refused if its layer's weights differ)."""
        tensors, meta = load_tensors(path, "factlens_grace")
        editor = cls(GraceConfig(**meta["config"]))
        editor.keys, editor.values = tensors["keys"], tensors["values"]
        editor.radii, editor.targets, editor.layer = list(meta["radii"]), list(meta["targets"]), meta["layer"]
        editor.base_fingerprint = meta["base_fingerprint"]
        editor.edited = [Fact.from_counterfact(r) for r in meta["facts"]]
        return editor.attach(model) if model is not None else editor

    # --- hooks --------------------------------------------------------------------------------------
    def _keep_key(self, key: torch.Tensor, hook) -> None:
        self._key = key

    def _replace(self, value: torch.Tensor, hook) -> torch.Tensor | None:
        key, self._key = self._key, None
        if not self._active or key is None or self.keys is None:
            return None
        entry, hit = self._nearest(key.float())
        return torch.where(hit[..., None].to(value.device), self.values[entry].to(value.device, value.dtype), value)

    def _nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest stored key at each position, and whether it lies within its radius."""
        distances = torch.cdist(keys.reshape(-1, keys.shape[-1]), self.keys).view(*keys.shape[:-1], -1)
        nearest, entry = distances.min(-1)
        radii = torch.tensor(self.radii, device=keys.device)
        return entry, nearest <= radii[entry]

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> list[Route]:
        """The codebook entry each prompt's last token uses (``memory`` None: the layer's own output)."""
        if self.keys is None:
            return [Route(p, None) for p in prompts]
        keys = [self.key_of(p) for p in prompts]
        entry, hit = self._nearest(torch.stack(keys))
        return [Route(p, int(e) if h else None) for p, e, h in zip(prompts, entry, hit)]

    def lookup(self, prompts: Sequence[str]) -> list[int | None]:
        """Just the entries of :meth:`route`."""
        return [r.memory for r in self.route(prompts)]

    # --- editing ------------------------------------------------------------------------------------
    def edit(self, facts: Fact | Sequence[Fact]) -> GraceResult | list[GraceResult]:
        """Add or update the codebook entry of each fact and train its value, one fact after the other
        (GRACE edits one at a time); one result for one fact, a list for a sequence. Every request is
        checked before the first changes anything."""
        if self.model is None:
            raise RuntimeError("attach the editor to a model first")
        requests = validate_requests(self.model, as_facts(facts), earlier=self.edited)
        results = [self._edit_one(fact) for fact in requests]
        return results[0] if isinstance(facts, Fact) else results

    def _edit_one(self, fact: Fact) -> GraceResult:
        model = self.model
        prompt = encode(model, fact.prompt)
        target = target_token_ids(model, fact.target_new)
        self._active = False
        try:
            with frozen_weights(model):
                recorded = record_rows(model, torch.tensor([prompt + target[:-1]], device=self._device()), self.layer)
                position = len(prompt) - 1
                key = recorded.keys[0, position]
                entry, action, distance = self._place(key, fact.target_new.strip(), recorded.outputs[0, position])
                loss = self._train(entry, recorded, position, target)
        finally:
            self._active = True
        self.edited.append(fact)
        return GraceResult(entry, action, distance, loss)

    def _place(self, key: torch.Tensor, label: str, output: torch.Tensor) -> tuple[int, str, float]:
        eps = self.config.eps_init
        if self.keys is None:
            return self._add(key, label, output, eps), "added", float("inf")
        distance, entry = (self.keys - key).norm(dim=-1).min(0)
        distance, entry = float(distance), int(entry)
        if distance > eps + self.radii[entry]:
            return self._add(key, label, output, eps), "added", distance
        if self.targets[entry] != label:
            self.radii[entry] = distance / 2 - 1e-5
            return self._add(key, label, output, distance / 2), "split", distance
        if distance > self.radii[entry]:
            self.radii[entry] = distance
            return entry, "expanded", distance
        return entry, "updated", distance

    def _add(self, key: torch.Tensor, label: str, output: torch.Tensor, radius: float) -> int:
        value = output.detach().float()
        self.keys = key[None] if self.keys is None else torch.cat([self.keys, key[None]])
        self.values = value[None] if self.values is None else torch.cat([self.values, value[None]])
        self.radii.append(radius)
        self.targets.append(label)
        return len(self.radii) - 1

    def _train(self, entry: int, recorded, position: int, target: list[int]) -> float:
        """Adam on the entry's value: cross-entropy of the target with the layer output at the key's
        position replaced by the value."""
        value = self.values[entry].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=self.config.edit_lr)
        positions = torch.arange(position, position + len(target))
        tokens = torch.tensor(target, device=value.device)
        base = recorded.hidden[0, position] - recorded.outputs[0, position]
        loss = torch.tensor(0.0)
        for _ in range(self.config.n_iter):
            hidden = recorded.hidden.clone()
            hidden[0, position] = base + value.to(hidden.dtype)
            final = replay_later_blocks(self.model, self.layer, recorded.calls, hidden)
            logits = logits_of(self.model, final[0, positions].to(tokens.device))
            loss = torch.nn.functional.cross_entropy(logits.float(), tokens)
            if loss.item() < self.config.stop_loss:
                break  # the value already gives the target: it is the one before this step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.values[entry] = value.detach()
        return float(loss.detach())

    @torch.no_grad()
    def key_of(self, prompt: str) -> torch.Tensor:
        """The key GRACE reads for a prompt: the down-projection input at its last token."""
        row = encode(self.model, prompt)
        return activations_at(self.model, [row], ModelAdapter.mlp_key(self.layer), stop_at_layer=self.layer + 1,
                              positions=[len(row) - 1])[0]

    def _device(self) -> torch.device:
        return input_device(self.model)
