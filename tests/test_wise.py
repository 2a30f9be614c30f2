"""WISE: behaviour on tiny random models, exact bookkeeping (shards, merges, TIES, save/load, detach), and
an end-to-end run of sequential edits on the embedded model."""

import dataclasses

import pytest
import torch

from editing.evaluate import evaluate_accuracy, locality_predictions, read_continuations
from editing.requests import EditRequestError
from editing.wise import (WiseConfig, WiseEditor, activation_scores, calibrated_floors, common_directions, default_layer,
                          running_score, ties_merge)
from tracing.adapter import ModelAdapter
from tracing.facts import Fact, evaluated_prompts, known_facts
from tracing.models import load_model
from tracing.tokens import encode
from conftest import weights_digest

# Tiny random models need bigger steps than SmolLM2 and have their own score scale (measured: edited
# prompts score 40-110, unrelated text 10-30 with these margins). Their keys know no subjects or relations,
# so the subject and relation negatives (other relations of the subject, other subjects of the relation) and
# the subject-prefix rows would only fight the edit: off here, tested on their own below. These tests are
# about the score router (margins, floors, thresholds), so every prompt may reach every memory
# (``route_match="any"``); the subject gate in front of it, the default, is tested in test_wise_subject_gate.
# The score router as it was tuned before the gate (and WISE's defaults then): running-max score, margins
# over all rows, fact-shaped negatives, a calibrated floor, common directions, replay.
SCORE_ROUTER = dict(score="max", score_positions="prompt", choose="ratio", margin_mean="all", weight_decay=0.0,
                    replay=16, negatives=256, negatives_per_edit=64, calibration=256, common_directions=32,
                    bare_contexts=True, context_prefixes=("The", "Therefore", "Because", "I", "You"))
TINY = WiseConfig(n_iter=60, edit_lr=0.3, mask_ratio=1.0, norm_constraint=10.0, alpha=10.0, beta=40.0, gamma=20.0,
                  loc_prefixes=("In", "We", "It", "My", "This", "When", "There", "She"), corrupted_samples=4,
                  subject_negatives=0, relation_negatives=0, subject_prefix=False, route_match="any", **SCORE_ROUTER)
FAST = dataclasses.replace(TINY, n_iter=2)  # bookkeeping tests: the edits need not succeed
EIFFEL = Fact("Eiffel Tower", "The {} is located in the city of", "Paris", "Rome")
UNRELATED = ["My favourite food is", "The weather today is", "She opened the door and"]


def logits(model, texts):
    from tracing.tokens import right_padded

    with torch.no_grad():
        return model(right_padded(model, [encode(model, t) for t in texts]))


def people(n):
    return [Fact(f"Person {i}", "{} was born in the city of", "Paris", f"Town{i}") for i in range(n)]


@pytest.fixture
def attached():
    """Attach editors through this; they are detached after the test even when it fails."""
    editors = []

    def attach(model, config=TINY, editor=None):
        editors.append((editor or WiseEditor(config)).attach(model))
        return editors[-1]

    yield attach
    for editor in editors:
        if editor.model is not None:
            editor.detach()


# --- behaviour --------------------------------------------------------------------------------------


def test_an_edit_makes_the_new_target_the_argmax_and_routes_only_the_edited_prompt(tiny_model, attached):
    before = read_continuations(tiny_model, [(EIFFEL.prompt, EIFFEL.target_new)])[0]
    editor = attached(tiny_model)
    result = editor.edit(EIFFEL)
    after = read_continuations(tiny_model, [(EIFFEL.prompt, EIFFEL.target_new)])[0]
    assert before.accuracy == 0.0 and after.accuracy == 1.0
    assert after.mean_nll < before.mean_nll - 5

    edited, *unrelated = editor.route([EIFFEL.prompt, *UNRELATED])
    threshold = editor.thresholds()[0]
    assert threshold == pytest.approx(max(TINY.act_ratio * min(result.in_scores), editor.memories[0].floor))
    assert edited.memory == 0 and edited.scores[0] > threshold
    assert all(r.memory is None and r.scores[0] < threshold for r in unrelated)


def test_the_threshold_floor_keeps_every_calibration_prompt_on_the_main_memory(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(TINY, negatives=16, negatives_per_edit=8, calibration=32))
    negatives, calibration = editor.negative_prompts, editor.calibration_prompts
    assert len(negatives) == 16 and len(calibration) == 32 and not set(negatives) & set(calibration)
    editor.edit(EIFFEL)
    memory = editor.memories[0]
    routes = editor.route(calibration)
    scores = sorted(r.scores[0] for r in routes)
    # the floor is the largest score of a calibration prompt (quantile 1.0), so none of them is routed ...
    assert memory.floor == pytest.approx(scores[-1]) and memory.floor > 0
    assert all(r.memory is None for r in routes)
    # ... and a lower quantile lets the top few through
    editor.config = dataclasses.replace(editor.config, calibration_quantile=0.5)
    editor.calibrator.refresh(editor.memories, editor.requests)
    assert memory.floor == pytest.approx(float(torch.tensor(scores).quantile(0.5)))


@pytest.mark.parametrize("mode", ["joint", "memory"])
def test_floors_keep_every_calibration_prompt_off_every_memory(tiny_llama, attached, mode):
    config = dataclasses.replace(FAST, save_freq=1, merge_freq=100, calibration=32, negatives=16, negatives_per_edit=8,
                                 calibration_mode=mode)
    editor = attached(tiny_llama, config)
    for fact in people(3):
        editor.edit(fact)
    memories = editor.memories
    assert len(memories) == 3 and all(m.floor > 0 and len(m.in_scores) == 1 for m in memories)
    routes = editor.route(editor.calibration_prompts)
    assert all(r.memory is None for r in routes)
    ratios = torch.tensor([r.scores for r in routes]) / torch.tensor([m.floor for m in memories])  # (prompts, memories)
    if mode == "joint":  # one factor over the memories' scales; the top prompt sits exactly at its memory's floor
        factors = [m.floor / m.scale for m in memories]
        assert max(factors) == pytest.approx(min(factors))
        assert float(ratios.max()) == pytest.approx(1.0, rel=1e-4)
    else:  # each memory's own maximum
        torch.testing.assert_close(ratios.max(0).values, torch.ones(3), rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", ["joint", "memory"])
@pytest.mark.parametrize("quantile", [1.0, 0.9])
def test_a_floor_keeps_out_every_prompt_it_was_calibrated_to_keep_out_whatever_the_rounding(mode, quantile):
    # 50 memories of arbitrary scales: c x scale computed in floats can round under the top prompt's own
    # score (it did for one of these prompts before the floors were snapped to the scores they keep out)
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 400, generator=generator) * 100
    scales = (torch.rand(50, generator=generator) * 90 + 10).tolist()
    floors = torch.tensor(calibrated_floors(scores, scales, quantile, mode), dtype=torch.float64)
    if mode == "joint":
        ratios = (scores.double() / torch.tensor(scales, dtype=torch.float64)[:, None]).max(0).values
        kept_out = ratios <= float(torch.quantile(ratios.float(), quantile)) * (1 - 1e-6)
    else:
        kept_out = scores.double() <= torch.quantile(scores, quantile, dim=1).double()[:, None] * (1 - 1e-6)
    for dtype in (torch.float32, torch.float64):  # the router compares in the memories' dtype
        above = scores.to(dtype) > floors.to(dtype)[:, None]
        assert not above[..., kept_out].any() if mode == "joint" else not above[kept_out].any()
    above = scores.double() > floors[:, None]  # the quantile still bounds what passes: all memories together
    routed = above.any(0).float().mean() if mode == "joint" else above.float().mean(1).max()  # or each its own
    assert routed == 0 if quantile == 1.0 else 0 < routed <= 1 - quantile + 1 / 400


def test_negative_rows_never_name_a_subject_of_the_edit(tiny_llama, attached):
    negatives = ["The capital of France is", "Paris is a city in", "The Eiffel Tower is made of", "My dog is"]
    editor = attached(tiny_llama, editor=WiseEditor(dataclasses.replace(TINY, negatives_per_edit=4), negatives, []))
    keys, valid = editor.negative_sampler.pool_rows([EIFFEL], editor.n_edits)
    assert len(keys) == 3  # the Eiffel Tower prompt is left out
    kept, _ = editor._negatives
    assert all(any(torch.equal(k, kept[i]) for i in (0, 1, 3)) for k in keys)
    editor.edit(EIFFEL)
    assert editor.calibration_prompts == [] and editor.memories[0].floor == 0.0


def test_subject_and_relation_negatives_are_other_facts_of_the_subject_and_of_the_relation(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(TINY, subject_negatives=6, relation_negatives=5))
    germany = known_facts(relation="P36")[0]  # The capital of Germany is -> Berlin
    assert (germany.subject, germany.relation) == ("Germany", "P36")
    editor.requests = [dataclasses.replace(germany, template="In {}, the official language is", relation="P37")]
    keys, valid = editor._fact_negative_rows(tiny_llama, [germany])
    assert len(keys) == 6 + 5 and valid.any(1).all()
    # the subject in templates of relations edited for it neither now nor before
    same_subject = editor.negative_sampler.subject_prompts([germany], editor.requests, editor.n_edits)
    assert len(same_subject) == 6 and all("Germany" in p for p in same_subject)
    own = {t.replace("{}", "Germany") for r in ("P36", "P37") for t in editor.templates[r]}
    assert not set(same_subject) & own
    # the relation's templates about subjects other than Germany, none named by a calibration prompt
    same_relation = editor.negative_sampler.relation_prompts([germany], editor.requests, editor.n_edits)
    assert len(same_relation) == 5
    parsed = [editor.relations.parse(p) for p in same_relation]
    assert all(relation == "P36" and subject != "Germany" for subject, relation in parsed)
    assert not {subject for subject, _ in parsed} & {editor.relations.parse(p)[0] for p in editor.calibration_prompts}
    # no prompt an evaluation or the calibration reads
    assert not set(same_subject + same_relation) & (evaluated_prompts() | set(editor.calibration_prompts))
    # an edit whose template is a known relation's gets that relation even without a relation id
    assert editor.relations.relation_of(dataclasses.replace(germany, relation=None)) == "P36"


def test_calibration_leaves_out_the_edited_facts_and_by_choice_their_subjects(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(TINY, calibration=0))
    germany = known_facts(relation="P36")[0]
    prompts = ["The capital of Germany is", "The capital city of Germany is", "In Germany, the official language is",
               "The capital of France is", "Germany and France are", "The capital of East Germany is"]
    assert editor.relations.parse(prompts[2]) == ("Germany", "P37") and editor.relations.parse(prompts[4]) is None
    # "fact": only prompts of the edited (subject, relation) or of unknown shape that name the subject
    assert editor.calibrator.out_of_scope(prompts, [germany]) == [2, 3]
    editor.config = dataclasses.replace(editor.config, calibration_scope="subject")
    assert editor.calibrator.out_of_scope(prompts, [germany]) == [3]
    with pytest.raises(ValueError, match="calibration_scope"):
        WiseConfig(calibration_scope="relation")


def test_behind_the_gate_training_lets_delta_act_only_where_the_gate_will(tiny_llama, attached):
    """``train_from_subject``: behind the subject gate Δ acts on an edit row only from the subject's last
    token on, as at inference; the training loss then ignores what Δ would do to the keys before it."""
    gated = dataclasses.replace(FAST, route_match="subject", train_from_subject=True, layer=1)  # blocks after it
    editor = attached(tiny_llama, gated)
    batch = editor._batch(tiny_llama, [EIFFEL])
    bare = editor._contexts.index("{}")
    subject_end = len(encode(tiny_llama, "The Eiffel Tower")) - 1
    assert not batch.acts[bare, :subject_end].any() and batch.acts[bare, subject_end:].all()
    delta = torch.randn_like(editor.current.delta)
    before = dataclasses.replace(batch, keys=batch.keys.clone())
    before.keys[:, :subject_end] += 5.0 * torch.randn_like(before.keys[:, :subject_end])
    assert editor._loss(tiny_llama, batch, delta)["nll"] == pytest.approx(float(editor._loss(tiny_llama, before, delta)["nll"]))
    everywhere = dataclasses.replace(batch, acts=None)  # EasyEdit's training: every position
    moved = dataclasses.replace(before, acts=None)
    assert float(editor._loss(tiny_llama, everywhere, delta)["nll"]) != pytest.approx(
        float(editor._loss(tiny_llama, moved, delta)["nll"]))
    editor.detach()
    ungated = attached(tiny_llama, dataclasses.replace(FAST, route_match="any", train_from_subject=True, layer=1))
    assert ungated._batch(tiny_llama, [EIFFEL]).acts is None  # no gate: Δ acts everywhere, as it will


def test_edit_rows_up_to_the_subject_are_trained_as_unrelated_rows(tiny_llama, attached):
    plain = attached(tiny_llama, FAST)
    rows_without = plain._batch(tiny_llama, [EIFFEL]).unrelated_valid
    plain.detach()
    editor = attached(tiny_llama, dataclasses.replace(FAST, subject_prefix=True))
    batch = editor._batch(tiny_llama, [EIFFEL])
    added = batch.unrelated_valid[len(rows_without):]
    assert len(added) == len(batch.keys)  # one prefix row per edit row
    for row, valid in zip(batch.keys, added):
        # each covers the tokens up to the subject's last one, and never a position that predicts the target
        length = int(valid.sum())
        assert valid[:length].all() and not valid[length:].any()
    bare = editor._contexts.index("{}")
    assert int(added[bare].sum()) == len(encode(tiny_llama, "The Eiffel Tower"))
    assert (added & batch.decision).sum() == 0


def test_unrelated_prompts_keep_bit_identical_logits_and_detach_restores_everything(tiny_llama, attached):
    digest = weights_digest(tiny_llama)
    clean = logits(tiny_llama, [EIFFEL.prompt, *UNRELATED])
    editor = attached(tiny_llama)
    editor.edit(EIFFEL)
    edited = logits(tiny_llama, [EIFFEL.prompt, *UNRELATED])
    assert not torch.equal(edited[0], clean[0])
    assert torch.equal(edited[1:], clean[1:])  # routed to the main memory: nothing at all changes
    assert weights_digest(tiny_llama) == digest
    editor.detach()
    assert torch.equal(logits(tiny_llama, [EIFFEL.prompt, *UNRELATED]), clean)
    assert weights_digest(tiny_llama) == digest


def test_routing_is_causal_padding_and_cache_invariant(tiny_llama, attached):
    from transformers import DynamicCache

    editor = attached(tiny_llama)
    editor.edit(EIFFEL)
    ids = encode(tiny_llama, EIFFEL.prompt)
    alone = logits(tiny_llama, [EIFFEL.prompt])[0]
    assert editor.route([EIFFEL.prompt])[0].memory == 0
    # right padding (a longer unrelated prompt in the batch) changes nothing at the real positions
    padded = logits(tiny_llama, [EIFFEL.prompt, "Python is a programming language that many people use"])
    torch.testing.assert_close(padded[0, : len(ids)], alone, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        # left padding with an attention mask, as in generation
        width = len(ids) + 3
        tokens = torch.tensor([[tiny_llama.tokenizer.pad_token_id] * 3 + ids])
        mask = torch.tensor([[0] * 3 + [1] * len(ids)])
        left = tiny_llama(tokens, attention_mask=mask)[0, width - 1]
        # key/value cache: the prefix in one call, the last token in the next
        cache = DynamicCache()
        tiny_llama(torch.tensor([ids[:-1]]), past_key_values=cache)
        cached = tiny_llama(torch.tensor([ids[-1:]]), past_key_values=cache)[0, -1]
    torch.testing.assert_close(left, alone[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, alone[-1], rtol=1e-4, atol=1e-4)


def test_running_scores_are_causal():
    scores = torch.tensor([[1.0, 4.0, 2.0, 9.0]])
    valid = torch.tensor([[True, True, True, False]])
    maximum, carry = running_score(scores, valid, "max")
    assert maximum.tolist() == [[1.0, 4.0, 4.0, 4.0]]
    mean, carry_mean = running_score(scores, valid, "mean")
    torch.testing.assert_close(mean, torch.tensor([[1.0, 2.5, 7 / 3, 7 / 3]]))
    # continuing a cached prefix gives what one call over the whole row gives
    more = torch.tensor([[3.0, 8.0]])
    whole, _ = running_score(torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0]]), None, "mean")
    continued, _ = running_score(more, None, "mean", carry_mean)
    torch.testing.assert_close(continued, whole[:, 3:])
    assert running_score(more, None, "max", carry)[0].tolist() == [[4.0, 8.0]]


# --- bookkeeping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("retrieve", [True, False])
def test_shards_are_saved_and_merged_at_the_configured_frequencies(tiny_llama, attached, retrieve):
    editor = attached(tiny_llama, dataclasses.replace(FAST, save_freq=2, merge_freq=4, retrieve=retrieve,
                                                      mask_ratio=0.2))
    masks = [editor.mask.clone()]
    digest = weights_digest(tiny_llama)
    sizes = []
    for fact in people(8):
        editor.edit(fact)
        sizes.append([m.n_edits for m in editor.memories])
        if not torch.equal(editor.mask, masks[-1]):
            masks.append(editor.mask.clone())
    if retrieve:  # every 2 edits a shard; every 4 the last two shards become one memory
        assert sizes == [[1], [2], [2, 1], [4], [4, 1], [4, 2], [4, 2, 1], [4, 4]]
    else:  # one merged memory; shards wait for the next merge next to it
        assert sizes == [[1], [2], [2, 1], [4], [4, 1], [4, 2], [4, 2, 1], [8]]
        assert len(set(editor.thresholds())) == 1
    assert len(masks) == 5  # a new random mask per shard, each training about mask_ratio of the entries
    assert all(0.15 < float(m.float().mean()) < 0.25 for m in masks)
    assert editor.n_edits == 8 and len(editor.requests) == 8
    assert weights_digest(tiny_llama) == digest


def test_merge_freq_zero_keeps_every_shard_as_its_own_memory(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(FAST, save_freq=2, merge_freq=0))
    for fact in people(5):
        editor.edit(fact)
    assert [m.n_edits for m in editor.memories] == [2, 2, 1]
    for bad in ({"merge_freq": -2}, {"merge_freq": 3}, {"save_freq": 0}):
        with pytest.raises(ValueError, match="merge_freq"):
            dataclasses.replace(FAST, save_freq=bad.get("save_freq", 2), merge_freq=bad.get("merge_freq", 0))


def test_only_masked_entries_are_trained(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(FAST, mask_ratio=0.2))
    editor.edit(EIFFEL)
    changed = editor.current.delta != 0
    assert changed.any()
    assert not (changed & ~editor.mask).any()
    assert float(editor.current.delta.abs().max()) <= FAST.norm_constraint


def test_common_directions_are_the_leading_eigenvectors_of_the_key_moment():
    generator = torch.Generator().manual_seed(0)
    shared = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    keys = 0.1 * torch.randn(500, 16, generator=generator) + (2.0 + torch.randn(500, 1, generator=generator)) * shared
    basis = common_directions(keys, 3)
    assert basis.shape == (16, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    assert abs(float(basis[:, 0] @ shared)) > 0.99  # the shared (mean) direction comes first
    assert common_directions(keys, 0).shape == (16, 0)


def test_side_memories_do_not_respond_to_the_common_directions(tiny_llama, attached):
    editor = attached(tiny_llama, dataclasses.replace(FAST, common_directions=2))
    editor.edit(EIFFEL)
    common = editor.common.T  # (2, d_mlp): keys made only of the directions generic text shares
    assert common.shape == (2, ModelAdapter.of(tiny_llama).d_mlp)
    delta = editor.current.delta
    other = torch.nn.functional.normalize(torch.randn(2, delta.shape[1], generator=torch.Generator().manual_seed(0)))
    # the side memory learns only from keys without these components, so Δ comes out orthogonal to them
    assert float(activation_scores(common, delta).max()) < 1e-4 * float(activation_scores(other, delta).min())
    torch.testing.assert_close(editor._specific(common), torch.zeros_like(common), atol=1e-5, rtol=0)


def test_ties_merge_trims_elects_signs_and_averages_the_agreeing_entries():
    a = torch.tensor([4.0, -2.0, 1.0, 0.5])
    b = torch.tensor([-1.0, -3.0, 2.0, 0.2])
    c = torch.tensor([2.0, 1.0, -5.0, 0.1])
    # density 0.5 keeps a = [4, -2, 0, 0], b = [0, -3, 2, 0], c = [2, 0, -5, 0]; elected signs + - - (+)
    torch.testing.assert_close(ties_merge([a, b, c], [1 / 3] * 3, 0.5), torch.tensor([3.0, -2.5, -5.0, 0.0]))
    torch.testing.assert_close(ties_merge([a, b, c], [0.6, 0.2, 0.2], 0.5), torch.tensor([3.5, -2.25, -5.0, 0.0]))
    torch.testing.assert_close(ties_merge([a], [1.0], 1.0), a)  # one vector, nothing trimmed: itself


def test_save_and_load_round_trip_exactly(tiny_llama, attached, tmp_path):
    editor = attached(tiny_llama, dataclasses.replace(TINY, save_freq=1, merge_freq=2))
    editor.edit(EIFFEL)
    editor.edit(people(1))
    expected = logits(tiny_llama, [EIFFEL.prompt, people(1)[0].prompt, *UNRELATED])
    path = editor.save(tmp_path / "wise.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wise.safetensors"]  # atomic: no temporary left
    editor.detach()

    loaded = WiseEditor.load(path)
    assert loaded.config == editor.config and loaded.n_edits == 2 and loaded.requests == editor.requests
    assert (loaded.negative_prompts, loaded.calibration_prompts) == (editor.negative_prompts, editor.calibration_prompts)
    assert [m.floor for m in loaded.memories] == [m.floor for m in editor.memories]
    attached(tiny_llama, editor=loaded)
    assert torch.equal(logits(tiny_llama, [EIFFEL.prompt, people(1)[0].prompt, *UNRELATED]), expected)
    assert loaded.thresholds() == editor.thresholds()
    loaded.detach()
    with pytest.raises(ValueError, match="differs"):
        WiseEditor.load(path).attach(load_model("tiny-llama", device="cpu", seed=1))


def test_invalid_requests_and_double_attachment_are_refused(tiny_llama, attached):
    editor = attached(tiny_llama)
    with pytest.raises(EditRequestError):
        editor.edit(Fact("Eiffel Tower", "The {} is located in", "Paris"))  # no target_new
    assert editor.memories == [] and editor.n_edits == 0
    with pytest.raises(RuntimeError, match="another WiseEditor"):
        WiseEditor(TINY).attach(tiny_llama)


def test_default_layer_follows_the_paper():
    assert default_layer(32) == 27 and default_layer(30) == 25 and default_layer(4) == 3


# --- the embedded model ---------------------------------------------------------------------------------


@pytest.mark.embedded
def test_sequential_edits_on_the_embedded_model(embedded, attached):
    first_of_relation: dict[str, Fact] = {}
    for fact in known_facts():
        first_of_relation.setdefault(fact.relation, fact)
    relations = list(first_of_relation.values())
    edits = relations[::6][:3]  # capital of Germany -> Jerusalem, currency of the UK -> lira, hot -> wet
    # Two locality sets: the bundled pairs (other subjects of the edited relations, the hard case) and, as
    # in the WISE paper's unrelated questions, 30 prompts of six relations that are not edited.
    other = [dataclasses.replace(edit, locality=first.locality + second.locality)
             for edit, first, second in zip(edits, relations[3::6][:3], relations[4::6][:3])]
    own_baseline, other_baseline = locality_predictions(embedded, edits), locality_predictions(embedded, other)
    editor = attached(embedded, WiseConfig())
    layer_weight = ModelAdapter.down_projection(embedded, editor.layer).detach().clone()
    for fact in edits:
        editor.edit(fact)
    assert [m.n_edits for m in editor.memories] == [3]  # edits accumulate in one side memory
    own, unrelated = evaluate_accuracy(embedded, edits, own_baseline), evaluate_accuracy(embedded, other, other_baseline)
    # measured: reliability 1.0, generalization 1.0, locality 1.0 on both sets (the neighbours score 12-76
    # against a threshold of 85; before the fact-shaped negatives and the calibrated floor, 10 of the 15
    # neighbours were routed and "The capital of Hungary is" answered Jerusalem: locality 0.49)
    assert own.reliability >= 0.9 and own.generalization >= 0.5
    assert own.locality >= 0.9 and unrelated.locality >= 0.9
    neighbours = editor.route([prompt for fact in edits for prompt, _ in fact.locality])
    assert sum(r.memory is not None for r in neighbours) <= 2
    routes = editor.route([f.prompt for f in edits] + UNRELATED)
    assert [r.memory for r in routes[: len(edits)]] == [0] * len(edits)
    assert [r.memory for r in routes[len(edits):]] == [None] * len(UNRELATED)
    assert torch.equal(ModelAdapter.down_projection(embedded, editor.layer), layer_weight)


# --- GRACE, the codebook baseline -----------------------------------------------------------------------


def test_grace_edits_only_the_stored_key(tiny_llama):
    from editing.grace import GraceConfig, GraceEditor

    clean = logits(tiny_llama, [EIFFEL.prompt, *UNRELATED])
    editor = GraceEditor(GraceConfig(n_iter=30, edit_lr=0.5)).attach(tiny_llama)
    try:
        result = editor.edit(EIFFEL)
        assert result.action == "added" and editor.lookup([EIFFEL.prompt, *UNRELATED]) == [0, None, None, None]
        assert read_continuations(tiny_llama, [(EIFFEL.prompt, EIFFEL.target_new)])[0].accuracy == 1.0
        assert torch.equal(logits(tiny_llama, [EIFFEL.prompt, *UNRELATED])[1:], clean[1:])
    finally:
        editor.detach()
    assert torch.equal(logits(tiny_llama, [EIFFEL.prompt, *UNRELATED]), clean)


def test_grace_stops_training_a_value_once_its_loss_is_below_stop_loss(tiny_llama):
    """A stop above the unedited loss takes no step (the value is the layer's own output); 0 trains all
    n_iter steps; a stop between the two ends training as soon as the loss is below it."""
    from editing.grace import GraceConfig, GraceEditor

    def edit(stop: float) -> float:
        editor = GraceEditor(GraceConfig(n_iter=30, edit_lr=0.5, stop_loss=stop)).attach(tiny_llama)
        try:
            loss = editor.edit(EIFFEL).loss
            if stop == 0.0:
                assert read_continuations(tiny_llama, [(EIFFEL.prompt, EIFFEL.target_new)])[0].accuracy == 1.0
            if stop > 1e6:
                assert torch.equal(logits(tiny_llama, [EIFFEL.prompt]), clean)
            return loss
        finally:
            editor.detach()

    clean = logits(tiny_llama, [EIFFEL.prompt])
    unedited, trained = edit(1e9), edit(0.0)
    stop = (unedited + trained) / 2
    assert trained < edit(stop) < stop < unedited


def test_grace_codebook_adds_expands_and_splits_radii(tiny_llama):
    from editing.grace import GraceConfig, GraceEditor

    other = Fact("Colosseum", "The {} is located in the city of", "Naples", "Rome")  # same label as EIFFEL
    editor = GraceEditor(GraceConfig(n_iter=1)).attach(tiny_llama)
    try:
        distance = float((editor.key_of(EIFFEL.prompt) - editor.key_of(other.prompt)).norm())
        editor.config = GraceConfig(n_iter=1, eps_init=0.75 * distance)
        assert editor.edit(EIFFEL).action == "added"
        assert editor.edit(other).action == "expanded"  # beyond the radius but within eps_init of it
        assert editor.radii == [pytest.approx(distance, rel=1e-4)]
        assert editor.edit(EIFFEL).action == "updated"
        # the same prompt with another label (as another relation: a stream refuses re-editing one fact)
        clash = Fact("Colosseum", "The {} is located in the city of", "Rome", "Paris", relation="P-clash")
        assert editor.edit(clash).action == "split"
        assert editor.radii[0] < editor.radii[1] == pytest.approx(distance / 2, rel=1e-4)
        assert editor.lookup([EIFFEL.prompt, other.prompt]) == [0, 1]
    finally:
        editor.detach()
