import dataclasses

import numpy as np
import pytest

from tracing.average import (TOKEN_ROLES, average_indirect_effect, choose_critical_layers, token_roles,
                             trace_facts)
from tracing.causal_trace import FactTrace, TraceConfig, trace_fact
from tracing.facts import fact_from_prompt
from tracing.locate import locate


def _trace(n_tokens, subject_range, mlp, corrupted=0.1, correct=True):
    return FactTrace(
        prompt="p", subject="s", tokens=["t"] * n_tokens, token_ids=list(range(n_tokens)),
        subject_range=subject_range, answer=" a", answer_id=1, clean_top=" a" if correct else " b",
        clean_prob=0.9, corrupted_prob=corrupted, noise=1.0, samples=1, window=10, seed=1,
        model_name="synthetic", scores={"mlp": np.asarray(mlp, dtype=float)},
    )


def test_token_roles_follow_rome_buckets():
    roles = token_roles(9, (1, 4))  # The [E iffel Tower] is located in the city | of
    assert roles == {
        "first subject token": [1], "middle subject tokens": [2], "last subject token": [3],
        "first subsequent token": [4], "further tokens": [5, 6, 7], "last token": [8],
    }
    single = token_roles(5, (3, 4))  # The capital of [Germany] is
    assert single["first subject token"] == single["last subject token"] == [3]
    assert single["middle subject tokens"] == [] and single["further tokens"] == []
    assert single["first subsequent token"] == single["last token"] == [4]  # overlap, as in ROME
    assert token_roles(3, (1, 3))["first subsequent token"] == []  # subject ends the prompt


def test_average_by_role_weights_tokens_like_rome_and_skips_wrong_facts():
    layers = 3
    a = _trace(5, (0, 3), np.arange(15).reshape(5, layers) / 100 + 0.1, corrupted=0.1)
    b = _trace(4, (1, 2), np.full((4, layers), 0.3), corrupted=0.2)
    wrong = _trace(4, (0, 1), np.full((4, layers), 0.9), correct=False)
    effect = average_indirect_effect([a, b, wrong], "mlp")
    assert effect.n_facts == 2 and effect.mean_corrupted_prob == pytest.approx(0.15)
    np.testing.assert_allclose(effect.mean_scores[0], (np.array([0.10, 0.11, 0.12]) + 0.3) / 2)
    np.testing.assert_allclose(effect.role("first subject token"), effect.mean_scores[0] - 0.15)
    # a: first 0, middle [1], last subject 2, next 3, last 4;  b: first = last subject = 1, next 2, last 3
    assert list(effect.counts) == [2, 1, 2, 2, 0, 2]
    np.testing.assert_allclose(effect.mean_scores[1], [0.13, 0.14, 0.15])
    assert np.isnan(effect.role("further tokens")).all()
    np.testing.assert_allclose(effect.mean_scores[5], (np.array([0.22, 0.23, 0.24]) + 0.3) / 2)


def test_critical_layers_band():
    n_layers = 12
    curve = np.zeros(n_layers)
    curve[6:9] = [0.3, 0.5, 0.4]
    mlp = np.full((3, n_layers), 0.1)
    mlp[1] += curve
    effect = average_indirect_effect([_trace(3, (1, 2), mlp)], "mlp")
    np.testing.assert_allclose(effect.role("last subject token"), curve)
    assert choose_critical_layers(effect, size=3).layers == (5, 6, 7)  # band ending at the peak (7)
    assert choose_critical_layers(effect, size=3, method="max-sum").layers == (6, 7, 8)
    assert choose_critical_layers(effect, size=20).layers == tuple(range(12))
    with pytest.raises(ValueError):
        choose_critical_layers(dataclasses.replace(effect, kind="attn"))


def test_trace_facts_over_a_tiny_model(tiny_llama):
    facts = [fact_from_prompt("The Eiffel Tower is in", "Eiffel Tower", "Paris"),
             fact_from_prompt("The capital of Germany is", "Germany", "Berlin")]
    traces = trace_facts(tiny_llama, facts, TraceConfig(kinds=("mlp",), samples=2, noise=1.0, show_progress=False))
    assert [t.subject for t in traces] == ["Eiffel Tower", "Germany"]
    effect = average_indirect_effect(traces, "mlp", only_correct=False)
    assert effect.n_facts == 2 and effect.mean_scores.shape == (len(TOKEN_ROLES), 4)


def test_last_subject_token_trace_matches_the_full_trace_there(tiny_llama):
    fact = fact_from_prompt("The Eiffel Tower is in", "Eiffel Tower", "Paris")
    config = TraceConfig(kinds=("mlp",), samples=2, window=1, show_progress=False)
    full = trace_fact(tiny_llama, fact, config=config)
    for engine in ("fast", "reference"):
        only = trace_fact(tiny_llama, fact, config=dataclasses.replace(config, tokens="last subject", engine=engine))
        last = full.subject_range[1] - 1
        np.testing.assert_allclose(only.scores["mlp"][last], full.scores["mlp"][last], atol=1e-6)
        others = np.delete(only.scores["mlp"], last, axis=0)
        assert np.isnan(others).all() and others.shape == (full.n_tokens - 1, 4)


def test_locate_records_the_single_layer_curve_beside_the_windowed_one(tiny_llama):
    facts = [fact_from_prompt("The Eiffel Tower is in", "Eiffel Tower", "Paris"),
             fact_from_prompt("The capital of Germany is", "Germany", "Berlin")]
    config = TraceConfig(kinds=("mlp",), samples=2, show_progress=False)
    result = locate(tiny_llama, facts, config, size=2, only_correct=False)
    one_layer = [trace_fact(tiny_llama, fact, config=dataclasses.replace(config, window=1)) for fact in facts]
    expected = (np.mean([t.scores["mlp"][t.subject_range[1] - 1] for t in one_layer], axis=0)
                - np.mean([t.corrupted_prob for t in one_layer]))
    assert result.single_layer.window == 1 and result.effects["mlp"].window == 10
    np.testing.assert_allclose(result.single_layer_curve, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.critical.single_layer_curve, expected, rtol=1e-6, atol=1e-12)
    # on a 4-layer model every window of 10 covers all layers: the windowed curve is flat, the single one is not
    assert np.ptp(result.windowed_curve) < 1e-9 < np.ptp(result.single_layer_curve)
