"""MEMIT (Meng et al., ICLR 2023): write many facts at once into a band of MLP layers.

For each request (a fact with ``target_new``):

1. **Target vector z** (:func:`compute_targets`): the residual stream after the last edited layer, at the
   subject's last token, is shifted by an optimised δ until the model prefers the new target over
   several context prefixes, with a KL term keeping "{subject} is a" stable, weight decay on δ and a norm
   clamp — MEMIT's ``compute_z``. All requests of a batch are optimised together (their δ are separate
   rows of one parameter; each request's loss depends only on its own row).
2. **Keys k** (:func:`compute_keys`): the down-projection input at the subject's last token, averaged
   over the context prefixes.
3. **Update**, layer by layer from the lowest: on the partly edited model, recompute keys and the current
   z-layer output, spread the remaining residual evenly over the layers left, and solve
   ``ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹`` in float64, where C0 = E[k kᵀ] is the key second moment.

With a single layer this is the soft (λ-regularised) form of ROME's rank-one update.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

if __name__ == "__main__":  # answer --help and refuse bad arguments before the slow imports below (torch)
    from editing.cli import memit_parser

    memit_parser().parse_args()

import torch
from tqdm.auto import tqdm

from editing.contexts import context_templates as generated_contexts
from editing.covariance import CorpusConfig, key_second_moments, load_key_stats_files
from editing.prompts import PromptRow, in_context, subject_row
from editing.requests import validate_requests
from editing.targets import TargetConfig, compute_targets
from editing.weights import WeightEdit, edit_for
from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.facts import Fact
from tracing.layer_set import LayerSet, critical_layers_for
from tracing.models import model_spec


GPTJ_MOM2_WEIGHT, GPTJ_D_MLP = 15000.0, 16384


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyperparameters; defaults are the paper's GPT-J settings except where noted.

    ``layers``: a :class:`~tracing.layer_set.LayerSet` (what ``locate()`` returns, with its provenance), a
    tuple of layers, or None for the critical layers last saved for the model (``python -m tracing.locate``,
    then the packaged result, then the paper's layers for GPT-J / GPT-2 XL).
    """

    layers: LayerSet | tuple[int, ...] | None = None
    mom2_weight: float | None = None  # λ; None: the paper's value for its models, else scaled by d_mlp
    targets: TargetConfig = field(default_factory=TargetConfig)
    context_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # tokens of each generated context, prefix included
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    key_stats: tuple[str, ...] = ()  # shared C0 files (editing.stats_file), used before the cache or the corpus
    seed: int = 0
    show_progress: bool = True

    def resolved_layer_set(self, model) -> LayerSet:
        """The layers to edit with their provenance, checked against the model."""
        if isinstance(self.layers, LayerSet):
            chosen = self.layers
        elif self.layers is not None:
            chosen = LayerSet(tuple(self.layers), "given")
        else:
            chosen = critical_layers_for(model)
        if chosen is None:
            raise ValueError(
                f"no critical layers known for {model_spec(model).name!r}: pass MemitConfig(layers=...) or run "
                "`python -m tracing.locate <model>` first"
            )
        n_layers = ModelAdapter.of(model).n_layers
        if any(not 0 <= layer < n_layers for layer in chosen.layers):
            raise ValueError(f"layers {chosen.layers} out of range for a {n_layers}-layer model")
        return chosen

    def resolved_layers(self, model) -> tuple[int, ...]:
        return self.resolved_layer_set(model).layers

    def resolved_mom2_weight(self, model) -> float:
        """λ. The realised fraction of a residual at a typical key is s / (1 + s) with s ≈ d_mlp / λ
        (kᵀ C0⁻¹ k ≈ d_mlp for keys like the corpus'), so without a paper value for the model we keep
        GPT-J's ratio, 15000 for d_mlp = 16384."""
        if self.mom2_weight is not None:
            return float(self.mom2_weight)
        paper = model_spec(model).paper_mom2_weight
        return paper if paper is not None else GPTJ_MOM2_WEIGHT * ModelAdapter.of(model).d_mlp / GPTJ_D_MLP


# --- context templates --------------------------------------------------------------------------------


def context_templates(model, config: MemitConfig) -> list[list[str]]:
    """MEMIT's templates for ``config`` (see :func:`editing.contexts.context_templates`)."""
    return generated_contexts(model, config.context_prefixes, config.context_length, config.seed)


# --- keys --------------------------------------------------------------------------------------------


def _states_at(model, rows: Sequence[PromptRow], hook_name: str, stop_at_layer: int) -> torch.Tensor:
    """The activation ``hook_name`` at each row's subject-last token, (len(rows), width)."""
    return activations_at(model, [r.ids for r in rows], hook_name, stop_at_layer,
                          positions=[r.lookup for r in rows], batch_size=64)


def compute_keys(model, requests: Sequence[Fact], layer: int, templates: list[list[str]]) -> torch.Tensor:
    """(n, d_mlp) keys: down-projection input at the subject's last token, averaged over each template
    group and then across groups (so the bare prompt weighs as much as all generated contexts)."""
    adapter = ModelAdapter.of(model)
    flat = [(g, context) for g, group in enumerate(templates) for context in group]
    rows = [subject_row(model, in_context(context, fact.template), fact.subject)
            for fact in requests for _, context in flat]
    states = _states_at(model, rows, adapter.mlp_key(layer), stop_at_layer=layer + 1)
    states = states.view(len(requests), len(flat), -1)
    group_means = [states[:, [i for i, (g, _) in enumerate(flat) if g == group]].mean(1)
                   for group in range(len(templates))]
    return torch.stack(group_means).mean(0)


def current_outputs(model, requests: Sequence[Fact], layer: int) -> torch.Tensor:
    """(n, d_model) residual stream after ``layer`` at the subject's last token of the bare prompts."""
    rows = [subject_row(model, fact.template, fact.subject) for fact in requests]
    return _states_at(model, rows, ModelAdapter.resid_out(layer), stop_at_layer=layer + 1)


# --- the update ------------------------------------------------------------------------------------------


def memit_update(keys: torch.Tensor, residuals: torch.Tensor, c0: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """MEMIT's closed form for one layer, in float64: ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹.

    ``keys`` (n, d_mlp), ``residuals`` (n, d_model), ``c0`` (d_mlp, d_mlp). ΔW (d_model, d_mlp) minimises
    ``λ E_k‖ΔW k‖² + Σ_i ‖ΔW k_i - r_i‖²``: it writes the residuals at the new keys while keeping the
    outputs for keys from the corpus (second moment C0) nearly unchanged.
    """
    keys, residuals, c0 = keys.double(), residuals.to(keys.device, torch.float64), c0.to(keys.device, torch.float64)
    adjusted = torch.linalg.solve(mom2_weight * c0 + keys.T @ keys, keys.T)  # (d_mlp, n)
    return residuals.T @ adjusted.T


# (layer, keys (n, d_mlp), residuals (n, d_model), C0 (d_mlp, d_mlp)) -> ΔW (d_model, d_mlp)
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def memit_targets(model, requests: Sequence[Fact], config: MemitConfig = MemitConfig()) -> torch.Tensor:
    """MEMIT's target vectors z (n, d_model) for ``requests`` under ``config``, as :func:`apply_memit`
    computes them. They do not depend on C0 and are most of an edit's time, so a sweep over C0 computes
    them once and passes them to ``apply_memit(..., targets=...)``."""
    requests = validate_requests(model, requests)
    return compute_targets(model, requests, config.resolved_layers(model)[-1], context_templates(model, config),
                           config.targets, config.show_progress)


def apply_memit(model, requests: Sequence[Fact], config: MemitConfig = MemitConfig(), *,
                solver: LayerSolver | None = None, method: str = "memit", targets: torch.Tensor | None = None,
                c0: Mapping[int, torch.Tensor] | None = None) -> WeightEdit:
    """Edit ``model`` in place so each request's prompt continues with its ``target_new``.

    Returns the applied :class:`~editing.weights.WeightEdit`; ``edit.undo(model)`` restores the weights
    bit for bit. Invalid requests raise before any weight changes. ``solver`` replaces MEMIT's closed form
    per layer (AlphaEdit's null-space projected update uses the same targets, keys and residuals).
    ``targets`` (from :func:`memit_targets` for the same requests and config) and ``c0`` (C0 by edited
    layer, used instead of ``config.key_stats`` and ``config.corpus``) skip computing them, for sweeps
    that vary one part of the edit (``benchmarks/c0_samples.py``).
    """
    requests = validate_requests(model, requests)
    layer_set = config.resolved_layer_set(model)
    layers = layer_set.layers
    mom2_weight = config.resolved_mom2_weight(model)
    adapter = ModelAdapter.of(model)
    if c0 is None:
        mom2 = key_second_moments(model, layers, config.corpus, show_progress=config.show_progress,
                                  files=config.key_stats)
    else:
        mom2 = dict(c0)
        missing = [layer for layer in layers if layer not in mom2]
        if missing:
            raise ValueError(f"c0 lacks the edited layers {missing}")
    templates = context_templates(model, config)
    z_layer = layers[-1]
    if targets is None:
        zs = compute_targets(model, requests, z_layer, templates, config.targets, config.show_progress)
    elif tuple(targets.shape) != (len(requests), adapter.d_model):
        raise ValueError(f"targets of shape {tuple(targets.shape)} for {len(requests)} requests "
                         f"(expected ({len(requests)}, {adapter.d_model}))")
    else:
        zs = targets

    originals = {layer: adapter.down_projection(model, layer).detach().clone() for layer in layers}
    deltas: dict[int, torch.Tensor] = {}
    try:
        for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", disable=not config.show_progress, leave=False)):
            keys = compute_keys(model, requests, layer, templates)
            current = current_outputs(model, requests, z_layer)
            # what is still missing at the z layer, spread evenly over this and the remaining layers
            residuals = (zs.double() - current.to(zs.device, torch.float64)) / (len(layers) - i)
            if solver is None:
                delta = memit_update(keys, residuals, mom2[layer], mom2_weight).float()
            else:
                delta = solver(layer, keys, residuals, mom2[layer]).float()
            deltas[layer] = delta.cpu()
            weight = adapter.down_projection(model, layer)
            with torch.no_grad():  # later layers are computed on the partly edited model
                weight.add_(adapter.to_stored_orientation(model, layer, delta).to(weight.device, weight.dtype))
    finally:
        with torch.no_grad():
            for layer, original in originals.items():
                adapter.down_projection(model, layer).copy_(original)
    # the weights are the originals again: the edit is fingerprinted against them and applied as a whole
    record = _config_record(config, layer_set, mom2_weight)
    if c0 is not None:
        record["corpus"], record["key_stats"] = "given", []  # C0 came from the caller, not from the config
    edit = edit_for(model, method, deltas, list(requests), record)
    return edit.apply(model)


def _config_record(config: MemitConfig, layer_set: LayerSet, mom2_weight: float) -> dict:
    record = dataclasses.asdict(config)
    record["layers"] = list(layer_set.layers)
    record["layer_source"] = {"source": layer_set.source, "detail": layer_set.detail}
    record["mom2_weight"] = mom2_weight
    record.pop("show_progress")
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m editing.memit``: edit N facts from a JSON file (or the bundled ones), evaluate before
    and after, write the table (see :func:`editing.cli.memit_parser`)."""
    from editing.cli import memit_parser
    from editing.evaluate import METRICS, evaluate_counterfact, markdown_table
    from tracing import cli
    from tracing.facts import one_per_subject, spread
    from tracing.io import write_json_atomic, write_text_atomic
    from tracing.models import ModelUnavailableError, UnknownModelError, load_model

    args = memit_parser().parse_args(argv)
    cli.check_model_name(args.model)
    cli.check_device(args.device)
    requests = spread(one_per_subject(cli.facts_from(args.facts)), args.n_edits)
    config = MemitConfig(layers=args.layers, mom2_weight=args.mom2_weight,
                         corpus=CorpusConfig(source=args.corpus, samples=args.corpus_samples,
                                             token_budget=args.corpus_tokens),
                         key_stats=tuple(str(path) for path in args.key_stats),
                         targets=TargetConfig(autocast=args.autocast))
    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=args.device)
    with cli.user_errors(ValueError):  # layers out of range, requests that cannot be edited: before any work
        load_key_stats_files(model, config.resolved_layers(model), config.key_stats)
        validate_requests(model, requests)
    before = evaluate_counterfact(model, requests, args.generation_cases)
    with cli.user_errors(ModelUnavailableError, ValueError):  # e.g. an hf: corpus without network
        edit = apply_memit(model, requests, config)
    after = evaluate_counterfact(model, requests, args.generation_cases)
    columns = [*METRICS, "GE"] if args.generation_cases else list(METRICS)
    rows = {"unedited": before.as_dict(), f"MEMIT ({len(requests)} edits)": after.as_dict()}
    table = markdown_table(rows, columns, plain=["GE"])
    print(f"layers {list(edit.layers)}, λ = {edit.config['mom2_weight']:.0f}\n{table}")
    out = args.out_dir
    write_text_atomic(out / "memit_eval.md", table + "\n")
    write_json_atomic(out / "memit_eval.json", {"config": edit.config, "n_edits": len(requests), **rows})
    if args.save_edit:
        print(f"edit saved to {edit.save(args.save_edit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
