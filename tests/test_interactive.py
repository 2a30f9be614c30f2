"""Interactive (plotly) heatmaps: one panel per kind holding the trace's own numbers, readable on hover."""

import dataclasses
import re

import numpy as np
import pytest

from tracing.average import average_indirect_effect
from tracing.causal_trace import TraceConfig, trace_prompt
from tracing.interactive import interactive_average_effect, interactive_trace
from tracing.plot import describe_trace

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


@pytest.fixture(scope="module")
def trace(tiny_llama):
    return trace_prompt(tiny_llama, PROMPT, SUBJECT, config=TraceConfig(samples=2, noise=1.0, show_progress=False))


def _number(text: str, name: str) -> float:
    return float(re.search(rf"{re.escape(name)} = ([-+0-9.e]+)", text).group(1))


def _heatmaps(fig):
    return [d for d in fig.data if d.type == "heatmap"]


def test_one_heatmap_per_kind_holding_the_scores(trace):
    fig = interactive_trace(trace)
    heatmaps = _heatmaps(fig)
    assert [h.name for h in heatmaps] == list(trace.kinds) == ["resid", "mlp", "attn"]
    for heatmap in heatmaps:
        np.testing.assert_array_equal(np.asarray(heatmap.z), trace.scores[heatmap.name])
        assert list(heatmap.y) == list(range(trace.n_tokens))  # positions, so repeated tokens stay separate rows
        assert heatmap.zmin == pytest.approx(trace.corrupted_prob)  # white = nothing restored, as plot_trace
    assert describe_trace(trace) in fig.layout.title.text  # says how the trace was scored


def test_hover_names_token_layer_score_and_indirect_effect(trace):
    heatmap = _heatmaps(interactive_trace(trace))[1]
    effect = trace.indirect_effect("mlp")
    token, layer = np.unravel_index(np.abs(effect).argmax(), effect.shape)
    text = heatmap.text[token][layer]
    assert f"<b>{trace.tokens[token]!r}</b> (position {token}" in text
    assert f"MLP output, layer {layer} (layers " in text
    assert _number(text, "p(" + trace.answer.strip() + ")") == pytest.approx(trace.scores["mlp"][token, layer], rel=1e-3)
    assert _number(text, "indirect effect") == pytest.approx(effect[token, layer], rel=1e-3, abs=1e-12)
    other = heatmap.text[token][(layer + 1) % trace.n_layers]
    assert f"layer {(layer + 1) % trace.n_layers} " in other and other != text


def test_subject_rows_are_starred_and_shaded(trace):
    fig = interactive_trace(trace)
    start, end = trace.subject_range
    labels = list(fig.layout.yaxis.ticktext)
    assert [i for i, label in enumerate(labels) if label.endswith("*")] == list(range(start, end)) == [1, 2, 3]
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(bands) == len(trace.kinds)  # one band per panel
    assert all((b.y0, b.y1) == (start - 0.5, end - 0.5) for b in bands)
    subject_text = _heatmaps(fig)[0].text
    assert ", subject)" in subject_text[start][0] and ", subject)" not in subject_text[end][0]


def test_noising_trace_reverses_the_scale_and_the_effect(trace):
    noised = dataclasses.replace(trace, direction="noising")
    heatmap = _heatmaps(interactive_trace(noised, kinds=["attn"]))[0]
    assert heatmap.reversescale and heatmap.zmax == pytest.approx(trace.clean_prob)
    assert _number(heatmap.text[0][0], "indirect effect") == pytest.approx(
        trace.clean_prob - trace.scores["attn"][0, 0], rel=1e-3, abs=1e-12)
    assert "layers 0–" in heatmap.text[0][0] and "corrupted" in heatmap.text[0][0]


def test_unknown_kind_is_refused(trace):
    only_mlp = dataclasses.replace(trace, scores={"mlp": trace.scores["mlp"]})
    with pytest.raises(ValueError, match="no scores for kind"):
        interactive_trace(only_mlp, kinds=["attn"])


def test_average_effect_figure(trace):
    effects = [average_indirect_effect([trace], kind) for kind in ("mlp", "attn")]
    fig = interactive_average_effect(effects)
    heatmaps = _heatmaps(fig)
    assert [h.name for h in heatmaps] == ["mlp", "attn"]
    np.testing.assert_allclose(np.asarray(heatmaps[0].z), np.clip(np.nan_to_num(effects[0].effect), 0, None))
    assert list(fig.layout.yaxis.ticktext) == list(effects[0].roles)
    last_subject = effects[0].roles.index("last subject token")
    text = heatmaps[0].text[last_subject][2]
    assert text.startswith("<b>last subject token</b>") and "layer 2" in text
    assert _number(text, "AIE") == pytest.approx(effects[0].effect[last_subject, 2], rel=1e-3, abs=1e-12)
    with pytest.raises(ValueError):
        interactive_average_effect([])
