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

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from editing.contexts import context_templates as generated_contexts
from editing.covariance import CorpusConfig, key_second_moments
from editing.prompts import PromptRow, in_context, right_padded, subject_row
from editing.requests import validate_requests
from editing.targets import TargetConfig, compute_targets
from editing.weights import WeightEdit, edit_for
from tracing.adapter import ModelAdapter
from tracing.facts import SLOT, Fact
from tracing.locate import critical_layers_for
from tracing.models import model_spec


GPTJ_MOM2_WEIGHT, GPTJ_D_MLP = 15000.0, 16384


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyperparameters; defaults are the paper's GPT-J settings except where noted.

    ``layers=None`` takes the critical layers tracing found for the model (``python -m tracing.locate``),
    falling back to the paper's layers for GPT-J / GPT-2 XL.
    """

    layers: tuple[int, ...] | None = None
    mom2_weight: float | None = None  # λ; None: the paper's value for its models, else scaled by d_mlp
    targets: TargetConfig = field(default_factory=TargetConfig)
    context_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # tokens of each generated context, prefix included
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    seed: int = 0
    show_progress: bool = True

    def resolved_layers(self, model) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else critical_layers_for(model)
        if not layers:
            raise ValueError(
                f"no critical layers known for {model_spec(model).name!r}: pass MemitConfig(layers=...) or run "
                "`python -m tracing.locate <model>` first"
            )
        n_layers = ModelAdapter.of(model).n_layers
        if any(not 0 <= layer < n_layers for layer in layers):
            raise ValueError(f"layers {layers} out of range for a {n_layers}-layer model")
        return tuple(sorted(set(layers)))

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


@torch.no_grad()
def _states_at(model, rows: Sequence[PromptRow], hook_name: str, stop_at_layer: int,
               batch_size: int = 64) -> torch.Tensor:
    """The activation ``hook_name`` at each row's subject-last token, (len(rows), width)."""
    collected: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        lookups = torch.tensor([r.lookup for r in batch])
        captured: dict[str, torch.Tensor] = {}

        def keep(value: torch.Tensor, hook) -> None:
            captured["value"] = value[torch.arange(len(batch)), lookups.to(value.device)].float()

        model.run_with_hooks(right_padded(model, [r.ids for r in batch]), fwd_hooks=[(hook_name, keep)],
                             stop_at_layer=stop_at_layer)
        collected.append(captured["value"])
    return torch.cat(collected)


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
    keys, residuals, c0 = keys.double(), residuals.double(), c0.to(keys.device, torch.float64)
    adjusted = torch.linalg.solve(mom2_weight * c0 + keys.T @ keys, keys.T)  # (d_mlp, n)
    return residuals.T @ adjusted.T


def apply_memit(model, requests: Sequence[Fact], config: MemitConfig = MemitConfig()) -> WeightEdit:
    """Edit ``model`` in place so each request's prompt continues with its ``target_new``.

    Returns the applied :class:`~editing.weights.WeightEdit`; ``edit.undo(model)`` restores the weights
    bit for bit. Invalid requests raise before any weight changes.
    """
    requests = validate_requests(model, requests)
    layers = config.resolved_layers(model)
    mom2_weight = config.resolved_mom2_weight(model)
    adapter = ModelAdapter.of(model)
    mom2 = key_second_moments(model, layers, config.corpus, show_progress=config.show_progress)
    templates = context_templates(model, config)
    z_layer = layers[-1]
    zs = compute_targets(model, requests, z_layer, templates, config.targets, config.show_progress)

    originals = {layer: adapter.down_projection(model, layer).detach().clone() for layer in layers}
    deltas: dict[int, torch.Tensor] = {}
    try:
        for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", disable=not config.show_progress, leave=False)):
            keys = compute_keys(model, requests, layer, templates)
            current = current_outputs(model, requests, z_layer)
            # what is still missing at the z layer, spread evenly over this and the remaining layers
            residuals = (zs.double() - current.double()) / (len(layers) - i)
            delta = memit_update(keys, residuals, mom2[layer], mom2_weight).float()
            deltas[layer] = delta.cpu()
            weight = adapter.down_projection(model, layer)
            with torch.no_grad():  # later layers are computed on the partly edited model
                weight.add_(adapter.to_stored_orientation(model, layer, delta).to(weight.dtype))
    finally:
        with torch.no_grad():
            for layer, original in originals.items():
                adapter.down_projection(model, layer).copy_(original)
    # the weights are the originals again: the edit is fingerprinted against them and applied as a whole
    edit = edit_for(model, "memit", deltas, list(requests), _config_record(config, layers, mom2_weight))
    return edit.apply(model)


def _config_record(config: MemitConfig, layers: tuple[int, ...], mom2_weight: float) -> dict:
    record = dataclasses.asdict(config)
    record["layers"] = list(layers)
    record["mom2_weight"] = mom2_weight
    record.pop("show_progress")
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m editing.memit``: edit N facts from a JSON file (or the bundled ones), evaluate before
    and after, write the table."""
    from editing.evaluate import METRICS, evaluate_counterfact, markdown_table
    from tracing.facts import known_facts, load_facts, one_per_subject, spread
    from tracing.io import write_json_atomic, write_text_atomic
    from tracing.models import EMBEDDED_MODEL, ModelUnavailableError, UnknownModelError, load_model

    parser = argparse.ArgumentParser(prog="python -m editing.memit", description=main.__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=EMBEDDED_MODEL)
    parser.add_argument("--facts", default=None, help="CounterFact or zsRE JSON (default: the bundled known facts)")
    parser.add_argument("-n", "--n-edits", type=int, default=100, help="how many facts to edit at once")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: from tracing)")
    parser.add_argument("--mom2-weight", type=float, default=None, help="λ (default: scaled from GPT-J's 15000)")
    parser.add_argument("--corpus", default="model", help="C0 corpus: model, a text file/folder, or hf:<dataset>")
    parser.add_argument("--corpus-samples", type=int, default=1000)
    parser.add_argument("--generation-cases", type=int, default=0, help="cases whose generations give GE")
    parser.add_argument("--out-dir", default="out/memit", help="where the evaluation table is written")
    parser.add_argument("--save-edit", default=None, help="save the edit (.safetensors)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    try:
        model = load_model(args.model, device=args.device)
        facts = load_facts(args.facts) if args.facts else known_facts()
        config = MemitConfig(
            layers=tuple(int(x) for x in args.layers.split(",")) if args.layers else None,
            mom2_weight=args.mom2_weight,
            corpus=CorpusConfig(source=args.corpus, samples=args.corpus_samples),
        )
        requests = spread(one_per_subject(facts), args.n_edits)
        before = evaluate_counterfact(model, requests, args.generation_cases)
        edit = apply_memit(model, requests, config)
    except (UnknownModelError, ModelUnavailableError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    after = evaluate_counterfact(model, requests, args.generation_cases)
    columns = [*METRICS, "GE"] if args.generation_cases else list(METRICS)
    rows = {"unedited": before.as_dict(), f"MEMIT ({len(requests)} edits)": after.as_dict()}
    table = markdown_table(rows, columns, plain=["GE"])
    print(f"layers {list(edit.layers)}, λ = {edit.config['mom2_weight']:.0f}\n{table}")
    out = Path(args.out_dir)
    write_text_atomic(out / "memit_eval.md", table + "\n")
    write_json_atomic(out / "memit_eval.json", {"config": edit.config, "n_edits": len(requests), **rows})
    if args.save_edit:
        print(f"edit saved to {edit.save(args.save_edit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
