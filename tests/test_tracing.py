"""Causal tracing on tiny random models: the engine's bookkeeping must be exact."""

import dataclasses

import numpy as np
import pytest

from tracing.causal_trace import FactTrace, TraceConfig, trace_fact, trace_prompt
from tracing.engine import restored_layers
from tracing.facts import fact_from_prompt

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"
QUIET = TraceConfig(samples=4, noise=1.0, show_progress=False)


def test_scores_have_one_row_per_token_and_one_column_per_layer(tiny_model):
    trace = trace_prompt(tiny_model, PROMPT, SUBJECT, config=QUIET)
    assert set(trace.scores) == {"resid", "mlp", "attn"}
    for values in trace.scores.values():
        assert values.shape == (trace.n_tokens, 4)
        assert np.all((values >= 0) & (values <= 1))
    assert trace.tokens[trace.subject_range[0]].strip() == "E"
    assert trace.correct  # by default the traced answer is the model's own top-1


def test_fast_engine_matches_reference_engine(tiny_model):
    fast = trace_prompt(tiny_model, PROMPT, SUBJECT, config=QUIET)
    reference = trace_prompt(tiny_model, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, engine="reference"))
    assert fast.corrupted_prob == pytest.approx(reference.corrupted_prob, rel=1e-5)
    for kind in fast.kinds:
        np.testing.assert_allclose(fast.scores[kind], reference.scores[kind], rtol=1e-4, atol=1e-7)
    # and the restorations do matter on this model, so the comparison is not vacuous
    assert np.ptp(reference.scores["resid"]) > 0.1 * reference.clean_prob


def test_restoring_the_last_state_gives_back_the_clean_probability(tiny_llama):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET)
    last_token, last_layer = trace.n_tokens - 1, trace.n_layers - 1
    assert trace.scores["resid"][last_token, last_layer] == pytest.approx(trace.clean_prob, rel=1e-5)
    # restoring the subject's first token at the input of the network undoes none of the others' noise
    assert trace.clean_prob != pytest.approx(trace.corrupted_prob, rel=1e-3)


def test_restoring_nothing_that_matters_gives_the_corrupted_probability(tiny_llama):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET)
    start = trace.subject_range[0]
    for kind in trace.kinds:
        # tokens before the subject are not corrupted: restoring them is a no-op
        np.testing.assert_allclose(trace.scores[kind][:start], trace.corrupted_prob, rtol=1e-5)
    # the last layer's output at a non-final token never reaches the final prediction
    np.testing.assert_allclose(trace.scores["resid"][:-1, -1], trace.corrupted_prob, rtol=1e-4)


def test_zero_noise_leaves_everything_clean(tiny_llama):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, noise=0.0))
    assert trace.corrupted_prob == pytest.approx(trace.clean_prob, rel=1e-5)
    for values in trace.scores.values():
        np.testing.assert_allclose(values, trace.clean_prob, rtol=1e-4)


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_llama):
    first = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET)
    second = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET)
    other = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, seed=2))
    for kind in first.kinds:
        np.testing.assert_array_equal(first.scores[kind], second.scores[kind])
    assert not np.allclose(first.scores["resid"], other.scores["resid"])


def test_explicit_answer_and_fact_entry_point(tiny_llama):
    fact = fact_from_prompt(PROMPT, SUBJECT, "Paris", target_new="Rome")
    true = trace_fact(tiny_llama, fact, config=QUIET)
    new = trace_fact(tiny_llama, fact, answer="Rome", config=QUIET)
    assert true.answer.strip() == "Paris" and new.answer.strip() == "Rome"
    assert true.clean_prob != new.clean_prob


def test_trace_round_trips_through_npz(tiny_llama, tmp_path):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, kinds=("mlp",)))
    trace.save(tmp_path / "t.npz")
    loaded = FactTrace.load(tmp_path / "t.npz")
    assert loaded.kinds == ("mlp",) and loaded.subject_range == trace.subject_range
    np.testing.assert_array_equal(loaded.scores["mlp"], trace.scores["mlp"])
    assert loaded.tokens == trace.tokens and loaded.correct == trace.correct


def test_window_follows_rome():
    assert list(restored_layers("mlp", 0, 48, 10)) == list(range(0, 5))
    assert list(restored_layers("mlp", 20, 48, 10)) == list(range(15, 25))
    assert list(restored_layers("attn", 47, 48, 10)) == list(range(42, 48))
    assert list(restored_layers("resid", 7, 48, 10)) == [7]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        TraceConfig(kinds=("mlp", "ffn"))
    with pytest.raises(ValueError):
        TraceConfig(engine="turbo")
    with pytest.raises(ValueError):
        TraceConfig(samples=0)


def test_hooks_needing_full_forwards_switch_to_the_reference_engine(tiny_llama, monkeypatch):
    from tracing import causal_trace
    from tracing.engine import require_full_forwards

    used = []
    monkeypatch.setattr(causal_trace.PrefixEngine, "run", lambda *a, **k: used.append("fast") or pytest.fail())
    require_full_forwards(tiny_llama, "test", True)
    try:
        trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, kinds=("resid",)))
    finally:
        require_full_forwards(tiny_llama, "test", False)
    assert used == [] and trace.scores["resid"].shape == (trace.n_tokens, 4) and trace.engine == "reference"
