"""End to end on the embedded SmolLM2-135M: tracing finds where a known fact is read."""

import pytest

from tracing.causal_trace import TraceConfig, trace_prompt
from tracing.state import state_of

pytestmark = pytest.mark.embedded


def test_early_mlps_at_the_last_subject_token_carry_the_fact(embedded):
    trace = trace_prompt(embedded, "The mother tongue of Vladimir Putin is", "Vladimir Putin", answer="Russian",
                         config=TraceConfig(kinds=("mlp",), show_progress=False))
    assert trace.correct and trace.clean_prob > 0.5
    assert trace.corrupted_prob < 0.1  # the noise really destroys the fact
    last_subject = trace.subject_range[1] - 1
    assert trace.tokens[last_subject].strip() == "Putin"
    effect = trace.indirect_effect("mlp")[last_subject]
    n_layers = trace.n_layers
    assert effect[: n_layers // 2].max() > 0.2  # restoring early/middle MLPs brings "Russian" back
    assert effect[2 * n_layers // 3:].max() < 0.05  # late MLPs at that token do not
    # the fast engine was checked against the one-forward-per-cell reference on this model
    assert state_of(embedded).fast_engine_ok is True and trace.engine == "fast"


def test_residual_trace_moves_from_subject_to_last_token(embedded):
    trace = trace_prompt(embedded, "The capital of Germany is", "Germany",
                         config=TraceConfig(kinds=("resid",), show_progress=False))
    assert trace.answer.strip() == "Berlin"
    scores = trace.scores["resid"]
    subject, last = trace.subject_range[0], trace.n_tokens - 1
    # early on the information sits at the subject, late at the last token (ROME Fig. 1)
    assert scores[subject, 0] > 0.5 * trace.clean_prob
    assert scores[last, 0] < trace.corrupted_prob + 0.05
    assert scores[last, -1] == pytest.approx(trace.clean_prob, rel=1e-4)
    assert scores[subject, -1] < trace.corrupted_prob + 0.05
