"""MEMIT: the closed form, the edit object, request checks (tiny models) and one embedded run."""

import dataclasses

import numpy as np
import pytest
import torch

from editing.covariance import CorpusConfig, key_second_moments
from editing.evaluate import evaluate_counterfact, locality_pairs
from editing.memit import MemitConfig, apply_memit, compute_keys, context_templates, memit_update
from editing.requests import EditRequestError
from editing.weights import EditStateError, WeightEdit, fingerprints
from tracing.adapter import ModelAdapter
from tracing.facts import Fact, known_facts, spread
from tracing.models import load_model
from tracing.tokens import encode, target_token_ids

TINY_CORPUS = CorpusConfig(samples=48, max_tokens=24, batch_size=16)
TINY_CONFIG = MemitConfig(layers=(1, 2), corpus=TINY_CORPUS, show_progress=False)
REQUESTS = [
    Fact(subject="Eiffel Tower", template="The {} is located in the city of", target_true="Paris", target_new="Rome"),
    Fact(subject="Germany", template="The capital of {} is", target_true="Berlin", target_new="Madrid"),
]


def _next_token_prob(model, prompt, target):
    with torch.no_grad():
        logits = model(torch.tensor([encode(model, prompt)]))[0, -1]
    return float(torch.softmax(logits.float(), -1)[target_token_ids(model, target)[0]])


def test_closed_form_writes_new_keys_and_spares_corpus_keys():
    torch.manual_seed(0)
    d_mlp, d_model, n = 64, 16, 4
    corpus_keys = torch.randn(5000, d_mlp) @ torch.diag(torch.linspace(0.2, 2.0, d_mlp))
    c0 = corpus_keys.T @ corpus_keys / len(corpus_keys)
    new_keys = torch.randn(n, d_mlp) * 3
    residuals = torch.randn(n, d_model)
    delta = memit_update(new_keys, residuals, c0, mom2_weight=1.0)
    written = new_keys.double() @ delta.T
    assert torch.allclose(written, residuals.double(), atol=0.05 * residuals.norm(dim=1).max())
    spill = (corpus_keys[:500].double() @ delta.T).norm(dim=1).mean()
    assert spill < 0.1 * residuals.norm(dim=1).mean()
    # a larger λ protects C0 more and writes less
    softer = memit_update(new_keys, residuals, c0, mom2_weight=1e5)
    assert (new_keys.double() @ softer.T).norm() < 0.5 * written.norm()


def test_closed_form_on_a_tiny_model_layer(tiny_llama):
    layer = 1
    templates = [["{}"]]
    keys = compute_keys(tiny_llama, REQUESTS, layer, templates)
    c0 = key_second_moments(tiny_llama, [layer], TINY_CORPUS, show_progress=False)[layer]
    residuals = torch.randn(len(REQUESTS), tiny_llama.cfg.d_model) * 0.5
    delta = memit_update(keys, residuals, c0, mom2_weight=0.01).float()
    np.testing.assert_allclose((keys @ delta.T).numpy(), residuals.numpy(), atol=0.05)


def test_edit_moves_probability_to_the_new_target(tiny_llama):
    before = [_next_token_prob(tiny_llama, f.prompt, f.target_new) for f in REQUESTS]
    edit = apply_memit(tiny_llama, REQUESTS, dataclasses.replace(TINY_CONFIG, mom2_weight=1.0))
    try:
        after = [_next_token_prob(tiny_llama, f.prompt, f.target_new) for f in REQUESTS]
    finally:
        edit.undo(tiny_llama)
    # random tiny models react to context chaotically, so only a clear move is asserted here; the
    # embedded-model test below checks efficacy proper
    assert all(a > 2 * b for a, b in zip(after, before))
    assert set(edit.layers) == {1, 2} and all(v > 0 for v in edit.norms().values())


def test_targets_under_bf16_autocast_reach_the_float32_targets_and_leave_the_weights_alone(tiny_llama):
    """TargetConfig(autocast="bfloat16") trains the same δ in lower precision: the targets land where the
    float32 ones do (the step count is fixed, so no early stop hides a difference), nothing else changes."""
    from editing.memit import memit_targets
    from editing.targets import TargetConfig
    from conftest import weights_digest

    weights = weights_digest(tiny_llama)
    exact = TargetConfig(steps=10, loss_threshold=0.0)
    config = dataclasses.replace(TINY_CONFIG, targets=exact)
    z32 = memit_targets(tiny_llama, REQUESTS, config)
    z16 = memit_targets(tiny_llama, REQUESTS, dataclasses.replace(config, targets=dataclasses.replace(exact, autocast="bfloat16")))
    z0 = memit_targets(tiny_llama, REQUESTS, dataclasses.replace(config, targets=dataclasses.replace(exact, steps=1)))
    assert z16.dtype == z32.dtype == torch.float32 and weights_digest(tiny_llama) == weights
    moved, apart = (z32 - z0).norm(dim=1), (z16 - z32).norm(dim=1)
    assert (moved > 0).all() and (apart < 0.1 * moved).all(), (moved, apart)  # same δ up to bf16 rounding
    assert (apart > 0).any()  # and it did run in bf16
    with pytest.raises(ValueError, match="autocast must be None, 'bfloat16' or 'float16', got 'int8'"):
        TargetConfig(autocast="int8")


def test_undo_is_bit_exact_and_edits_stack(tiny_llama):
    adapter = ModelAdapter.of(tiny_llama)
    original = {l: adapter.down_projection(tiny_llama, l).detach().clone() for l in (1, 2)}
    first = apply_memit(tiny_llama, REQUESTS[:1], TINY_CONFIG)
    second = apply_memit(tiny_llama, REQUESTS[1:], TINY_CONFIG)
    with pytest.raises(EditStateError, match="most recently applied"):
        first.undo(tiny_llama)
    second.undo(tiny_llama)
    first.undo(tiny_llama)
    for layer, weight in original.items():
        assert torch.equal(adapter.down_projection(tiny_llama, layer), weight)
    with pytest.raises(EditStateError):
        first.undo(tiny_llama)


def test_save_load_onto_a_fresh_model(tiny_llama, tmp_path):
    edit = apply_memit(tiny_llama, REQUESTS, TINY_CONFIG)
    edited = _next_token_prob(tiny_llama, REQUESTS[0].prompt, "Rome")
    path = edit.save(tmp_path / "edit.safetensors")
    edit.undo(tiny_llama)

    loaded = WeightEdit.load(path)
    assert loaded.requests == REQUESTS and loaded.layers == (1, 2)
    assert loaded.config["layers"] == [1, 2]
    fresh = load_model("tiny-llama")  # same seed: same weights as the fixture's model
    loaded.apply(fresh)
    assert _next_token_prob(fresh, REQUESTS[0].prompt, "Rome") == pytest.approx(edited, rel=1e-5)
    other = load_model("tiny-llama", seed=7)
    with pytest.raises(EditStateError, match="not the ones this edit was computed on"):
        WeightEdit.load(path).apply(other)


def test_bad_requests_change_nothing(tiny_llama):
    before = fingerprints(tiny_llama, (1, 2))
    no_target = dataclasses.replace(REQUESTS[0], target_new=None)
    empty = dataclasses.replace(REQUESTS[0], target_new="  ")
    conflict = [REQUESTS[1], dataclasses.replace(REQUESTS[1], target_new="Oslo")]
    for bad in ([no_target], [empty], conflict, []):
        with pytest.raises(EditRequestError):
            apply_memit(tiny_llama, bad, TINY_CONFIG)
    with pytest.raises(ValueError, match="out of range"):
        apply_memit(tiny_llama, REQUESTS, dataclasses.replace(TINY_CONFIG, layers=(9,)))
    assert fingerprints(tiny_llama, (1, 2)) == before


def test_locality_pairs_leave_out_prompts_edited_in_the_same_run():
    spain, italy = ("The capital of Spain is", "Madrid"), ("The capital of Italy is", "Rome")
    france = Fact("France", "The capital of {} is", "Paris", "Lyon", locality=(spain, italy))
    edited_spain = Fact("Spain", "The capital of {} is", "Madrid", "Lisbon",
                        locality=(("The capital of France is", "Paris"),))
    assert locality_pairs([france]) == [spain, italy]
    assert locality_pairs([france, edited_spain]) == [italy]  # both answers are meant to change


def test_markdown_table_shows_fractions_as_percentages_and_plain_columns_as_they_are():
    from editing.evaluate import markdown_table

    table = markdown_table({"run": {"ES": 0.95, "GE": 0.5, "n": 3}, "unedited": {"ES": 0.0}},
                           ["ES", "GE", "n", "PS"], plain=["GE"])
    assert table.splitlines()[-1] == "| run | 95.0 | 0.5 | 3 | – |"


def test_context_templates_end_with_the_slot(tiny_llama):
    templates = context_templates(tiny_llama, TINY_CONFIG)
    assert templates[0] == ["{}"] and len(templates[1]) == len(TINY_CONFIG.context_prefixes)
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1])


@pytest.mark.embedded
def test_ten_known_facts_on_the_embedded_model(embedded):
    facts = spread(known_facts(), 10)
    before = evaluate_counterfact(embedded, facts)
    edit = apply_memit(embedded, facts, MemitConfig(show_progress=False))
    try:
        after = evaluate_counterfact(embedded, facts)
    finally:
        edit.undo(embedded)
    assert before.ES <= 0.1
    assert after.ES >= 0.9
    assert after.NS >= before.NS - 0.1
    assert after.PS > before.PS


def test_alphaedit_writes_new_keys_and_leaves_the_preserved_and_earlier_keys_alone():
    from editing.alphaedit import alphaedit_update, null_space_projector

    torch.manual_seed(0)
    d_mlp, d_model, n = 32, 8, 3
    basis = torch.linalg.qr(torch.randn(d_mlp, d_mlp))[0]
    preserved = basis[:, :20]  # what the layer normally sees spans 20 directions
    c0 = preserved @ torch.diag(torch.linspace(0.5, 2.0, 20)) @ preserved.T
    projector = null_space_projector(c0, threshold=2e-2)
    assert torch.linalg.matrix_rank(projector) == d_mlp - 20
    earlier = basis[:, 20:22].T.double() * 3  # keys of an earlier call, outside C0's span
    new_keys = (basis[:, 22:] @ torch.randn(d_mlp - 22, n)).T * 3 + (preserved @ torch.randn(20, n)).T
    residuals = torch.randn(n, d_model)
    delta = alphaedit_update(new_keys, residuals, projector, earlier.T @ earlier, l2=1e-3)
    assert (delta @ preserved.double()).abs().max() < 1e-8  # preserved keys: no change at all
    assert (delta @ earlier.T).norm() < 1e-3 * delta.norm()  # earlier edits: left alone
    written = new_keys.double() @ delta.T  # the part of the new keys outside both is written
    assert torch.nn.functional.cosine_similarity(written, residuals.double(), dim=1).min() > 0.5
    unprojected = alphaedit_update(new_keys, residuals, projector, torch.zeros(d_mlp, d_mlp), l2=1e-3)
    assert (unprojected @ earlier.T).norm() > 100 * (delta @ earlier.T).norm()  # C_prev is what protects them


def test_alphaedit_null_space_by_energy_keeps_the_directions_that_hold_the_keys():
    from editing.alphaedit import AlphaEditConfig, null_space_projector

    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    spectrum = torch.tensor([0.001] * 4 + [0.01] * 4 + [1.0] * 8, dtype=torch.float64)  # sum 8.044
    c0 = basis @ torch.diag(spectrum) @ basis.T
    by_energy = null_space_projector(c0, energy=0.006)  # 0.044 / 8.044 = 0.0055: both small groups
    assert torch.linalg.matrix_rank(by_energy) == 8
    assert (by_energy @ basis[:, 8:]).abs().max() < 1e-10  # the directions that carry the keys: untouched
    assert torch.linalg.matrix_rank(null_space_projector(c0, energy=0.001)) == 4  # only the smallest group fits
    assert torch.linalg.matrix_rank(null_space_projector(c0, threshold=0.005)) == 4  # the papers' rule
    with pytest.raises(ValueError, match="exactly one"):
        null_space_projector(c0, threshold=0.1, energy=0.01)
    for bad in (dict(nullspace_threshold=None, nullspace_energy=1.0), dict(nullspace_threshold=None, nullspace_energy=-0.1),
                dict(nullspace_threshold=0.0), dict(nullspace_energy=0.01), dict(nullspace_threshold=None), dict(l2=-1.0)):
        with pytest.raises(ValueError):
            AlphaEditConfig(**bad)
