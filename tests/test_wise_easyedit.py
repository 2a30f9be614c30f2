"""The ``wise-easyedit`` preset: EasyEdit's WISE hyperparameters (hparams/WISE/llama-7b.yaml) and its
routing rule, margins and weight decay as options of our WISE, on a tiny random model."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from editing.editor import method
from editing.wise import WiseConfig, WiseEasyEditConfig, WiseEditor
from editing.wise.routing import decide, hinge_mean
from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.facts import Fact
from tracing.tokens import encode
from conftest import weights_digest

PRESET = WiseEasyEditConfig()
FACTS = [Fact("Eiffel Tower", "The {} is located in the city of", "Paris", "Rome"),
         Fact("Person 1", "{} was born in the city of", "Paris", "Town1")]
PROMPTS = [fact.prompt for fact in FACTS] + [
    "Person 2 was born in the city of", "The Eiffel Tower is in", "My favourite food is", "The weather today is",
    "She opened the door and", "Person 1 was born in the city of Paris, and"]


def test_the_preset_holds_easyedits_values_and_the_benchmark_runs_it_by_name():
    easyedit = {  # hparams/WISE/llama-7b.yaml, and WISE.py / utils.py for the optimiser and the stop rule
        "mask_ratio": 0.2, "edit_lr": 1.0, "n_iter": 70, "norm_constraint": 1.0, "alpha": 5.0, "beta": 20.0,
        "gamma": 10.0, "act_ratio": 0.88, "save_freq": 500, "merge_freq": 1000, "density": 0.53, "retrieve": True,
        "replay": 0, "weight_decay": 1e-5, "stop_loss": 0.02, "stop_change": 1e-4, "score": "mean",
        "choose": "score", "margin_mean": "violated"}
    assert {name: getattr(PRESET, name) for name in easyedit} == easyedit
    ours_off = {"negatives": 0, "negatives_per_edit": 0, "calibration": 0, "corrupted_samples": 0,
                "subject_negatives": 0, "relation_negatives": 0, "subject_prefix": False, "common_directions": 0,
                "bare_contexts": False, "route_match": "any"}
    assert {name: getattr(PRESET, name) for name in ours_off} == ours_off
    # how the preset reads EasyEdit's rows: gaps over the answer positions, its five context prefixes
    assert PRESET.score_positions == "target" and PRESET.context_prefixes == ("I", "You", "Because", "Yes", "Q:")
    # WISE's defaults are this algorithm behind the subject gate, with a memory per 10 edits never merged
    gated = dataclasses.replace(PRESET, route_match="subject", save_freq=10, merge_freq=0)
    assert dataclasses.asdict(gated) == dataclasses.asdict(WiseConfig())
    assert PRESET.resolved_layer(32) == 27 and PRESET.resolved_layer(30) == 25  # LLaMA-2-7B's 27 of 32, scaled

    assert method("wise-easyedit").config_class is WiseEasyEditConfig and method("wise-easyedit").lifelong
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import default_config

    config = default_config("wise-easyedit", {"n_iter": 30})  # --methods wise-easyedit --set wise-easyedit.n_iter=30
    assert isinstance(config, WiseEasyEditConfig) and config.n_iter == 30 and config.alpha == 5.0
    with pytest.raises(ValueError, match="choose must be one of"):
        WiseEasyEditConfig(choose="largest")


def mean_gap(model, editor, prompt: str) -> float:
    """EasyEdit's routing statistic, computed here from scratch: the mean over the prompt's tokens of
    ||x Δᵀ||, x the side layer's down-projection input."""
    keys = activations_at(model, [encode(model, prompt)], ModelAdapter.mlp_key(editor.layer),
                          stop_at_layer=editor.layer + 1)[0]
    return float(torch.linalg.vector_norm(keys @ editor.memories[0].delta.T, dim=-1).mean())


def last_logits(model, prompts):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([encode(model, p)]))[0, -1] for p in prompts])


def test_a_prompt_is_routed_when_its_mean_gap_is_above_088_of_the_smallest_edit_gap(tiny_llama):
    weights, before = weights_digest(tiny_llama), last_logits(tiny_llama, PROMPTS)
    editor = WiseEditor(PRESET).attach(tiny_llama)
    try:
        in_scores = [score for fact in FACTS for score in editor.edit(fact).in_scores]
        [threshold] = editor.thresholds()
        assert editor.memories[0].floor == 0.0  # no calibration floor: the rule alone
        assert threshold == pytest.approx(0.88 * min(in_scores), rel=1e-6)
        gaps = [mean_gap(tiny_llama, editor, prompt) for prompt in PROMPTS]
        routes = editor.route(PROMPTS)
        assert [r.scores[0] for r in routes] == pytest.approx(gaps, rel=1e-4)
        assert [r.memory == 0 for r in routes] == [gap > threshold for gap in gaps]
        routed = [r.memory == 0 for r in routes]
        assert any(routed) and not all(routed), gaps  # both sides of the threshold are exercised
        # only the side memory changed: the weights are the same, and an unrouted prompt computes what it
        # computed before the edits, bit for bit, while a routed one does not
        after = last_logits(tiny_llama, PROMPTS)
        assert weights_digest(tiny_llama) == weights
        for i, is_routed in enumerate(routed):
            assert torch.equal(after[i], before[i]) != is_routed, PROMPTS[i]
    finally:
        editor.detach()
    assert torch.equal(last_logits(tiny_llama, PROMPTS), before)


def test_weight_decay_shrinks_the_side_weight_on_every_entry_and_the_gradient_only_on_masked_ones(tiny_llama):
    config = dataclasses.replace(PRESET, weight_decay=1e-3, n_iter=5, mask_ratio=0.2)
    editor = WiseEditor(config).attach(tiny_llama)
    try:
        assert editor.edit(FACTS[0]).loss > config.stop_loss  # no early stop: all 5 steps were taken
        main = ModelAdapter.of(tiny_llama).read_down_projection(tiny_llama, editor.layer)
        delta, mask = editor.current.delta, editor.mask
        shrunk = main * ((1 - config.edit_lr * config.weight_decay) ** config.n_iter - 1)  # W + Δ = W (1 - lr wd)^5
        torch.testing.assert_close(delta[~mask], shrunk[~mask], rtol=1e-4, atol=1e-9)
        assert not torch.allclose(delta[mask], shrunk[mask], rtol=1e-2, atol=0)  # the edit's gradient on top
    finally:
        editor.detach()


def test_of_several_memories_above_threshold_score_picks_the_largest_gap_and_ratio_the_furthest_above():
    keys = torch.ones(1, 1, 1)
    deltas = torch.tensor([10.0, 6.0]).reshape(2, 1, 1)  # gaps 10 and 6
    thresholds = torch.tensor([9.0, 3.0])  # both above; 10 / 9 < 6 / 3
    assert decide(keys, None, deltas, thresholds, "mean", choose="score")[1].item() == 0
    assert decide(keys, None, deltas, thresholds, "mean", choose="ratio")[1].item() == 1
    assert decide(keys, None, deltas, torch.tensor([11.0, 7.0]), "mean", choose="score")[1].item() == -1


def test_easyedit_averages_each_margin_over_its_violated_entries_only():
    hinge = torch.tensor([0.0, 2.0, 4.0, 0.0])
    assert hinge_mean(hinge, False).item() == 1.5 and hinge_mean(hinge, True).item() == 3.0
    assert hinge_mean(torch.zeros(3), True).item() == 0.0
    # two facts of two rows each, two unrelated rows; alpha / beta / gamma = 5 / 20 / 10
    in_rows, fact, out_rows = torch.tensor([25.0, 15.0, 30.0, 5.0]), torch.tensor([0, 0, 1, 1]), torch.tensor([3.0, 8.0])
    editor = WiseEditor(PRESET)
    violated = editor._margins(in_rows, out_rows, fact)
    # out - alpha: [-, 3]; beta - in: fact 0 [-, 5], fact 1 [-, 15]; out - in + gamma: fact 0 rows [-, -], [-, 3],
    # fact 1 rows [-, -], [8, 13]: each a mean over its positive entries, summed over the facts
    assert {k: v.item() for k, v in violated.items()} == {"below_alpha": 3.0, "above_beta": 20.0, "gap": 13.5}
    editor = WiseEditor(dataclasses.replace(PRESET, margin_mean="all"))
    editor._contexts = ["{}", "Yes. {}"]  # two rows per fact
    every = editor._margins(in_rows, out_rows, fact)
    assert {k: v.item() for k, v in every.items()} == {"below_alpha": 1.5, "above_beta": 10.0, "gap": 6.0}
