"""Interactive heatmaps for notebooks: hover a cell to read its token, layer, score and indirect effect.

The same panels as :mod:`tracing.plot` (tokens down the rows, layers across, one panel per kind in ROME's
colour maps, the same titles saying how the trace was scored), drawn with plotly so that a notebook reader
can read any cell's numbers instead of guessing them from a colour. Subject rows are starred and shaded.
The matplotlib figures stay the ones for papers (static files); these are for exploring.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tracing.engine import restored_layers
from tracing.metrics import metric_label
from tracing.plot import (KIND_COLORMAPS, KIND_TITLES, layer_axis_label, panel_title, token_labels,
                          trace_title)

SUBJECT_BAND = {"fillcolor": "rgba(255, 170, 0, 0.15)", "line": {"color": "rgb(230, 140, 0)", "width": 1.5}}
_ROW_PIXELS, _MARGIN_PIXELS = 22, 230


def interactive_trace(trace, kinds: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """One plotly heatmap per kind of a :class:`~tracing.causal_trace.FactTrace`; colour = the score
    (p(answer) or the configured metric), scaled from the corrupted run's score as in
    :func:`~tracing.plot.plot_trace` (noising traces: up to the clean score, colour map reversed).
    Hovering a cell shows its token, position, layer(s), kind, score and indirect effect."""
    kinds = list(kinds or trace.kinds)
    missing = [kind for kind in kinds if kind not in trace.scores]
    if missing:
        raise ValueError(f"the trace has no scores for kind(s) {missing}; it has {list(trace.kinds)}")
    noising = trace.direction == "noising"
    score_name = metric_label(trace.metric, trace.answer, trace.counterfactual)
    fig = _panels([panel_title(trace, kind) for kind in kinds], trace.n_tokens)
    for col, kind in enumerate(kinds, start=1):
        scores = np.asarray(trace.scores[kind], dtype=float)
        if noising:
            low, high = float(np.nanmin(scores)), trace.clean_prob
        else:
            low, high = trace.corrupted_prob, float(np.nanmax(scores))
        fig.add_trace(go.Heatmap(
            z=scores, x=list(range(trace.n_layers)), y=list(range(trace.n_tokens)),
            text=_trace_hover(trace, kind, score_name), hovertemplate="%{text}<extra></extra>",
            colorscale=KIND_COLORMAPS[kind], reversescale=noising, zmin=low, zmax=max(high, low + 1e-9),
            colorbar=_colorbar(fig, col, score_name), name=kind,
        ), row=1, col=col)
        fig.update_xaxes(title_text=layer_axis_label(kind, trace.window), row=1, col=col)
    labels = [_escape(label) for label in token_labels(trace.tokens, trace.subject_range)]
    fig.update_yaxes(tickvals=list(range(trace.n_tokens)), ticktext=labels, row=1, col=1)
    start, end = trace.subject_range
    fig.add_hrect(y0=start - 0.5, y1=end - 0.5, row=1, col="all", **SUBJECT_BAND)
    fig.update_layout(title={"text": _escape(title or trace_title(trace)).replace("\n", "<br>"),
                             "font": {"size": 13}})
    return fig


def interactive_average_effect(effects: Sequence, title: str | None = None) -> go.Figure:
    """Average indirect effect per token role and layer (:class:`~tracing.average.AverageEffect` s), one
    panel per kind. Colours as :func:`~tracing.plot.plot_average_effect` (clipped at 0, one shared scale);
    hovering shows the unclipped AIE, the mean restored score and how many score rows are behind it."""
    if not effects:
        raise ValueError("no average effects to draw")
    roles = list(effects[0].roles)
    clipped = [np.clip(np.nan_to_num(e.effect, nan=0.0), 0, None) for e in effects]
    top = max(float(c.max()) for c in clipped) or 1e-9
    fig = _panels([f"Restoring {KIND_TITLES[e.kind]}" for e in effects], len(roles))
    for col, (effect, values) in enumerate(zip(effects, clipped), start=1):
        fig.add_trace(go.Heatmap(
            z=values, x=list(range(values.shape[1])), y=list(range(len(roles))),
            text=_average_hover(effect), hovertemplate="%{text}<extra></extra>",
            colorscale=KIND_COLORMAPS[effect.kind], zmin=0.0, zmax=top, colorbar=_colorbar(fig, col, "AIE"),
            name=effect.kind,
        ), row=1, col=col)
        fig.update_xaxes(title_text=layer_axis_label(effect.kind, effect.window), row=1, col=col)
    fig.update_yaxes(tickvals=list(range(len(roles))), ticktext=roles, row=1, col=1)
    title = title or f"Average indirect effect over {effects[0].n_facts} facts"
    fig.update_layout(title={"text": _escape(title), "font": {"size": 13}})
    return fig


def _escape(text: str) -> str:
    """Plotly reads labels as a subset of HTML: escape ``<``, ``>`` and ``&`` (tokens such as ``<|im_start|>``)."""
    return html.escape(text, quote=False)


def _panels(titles: Sequence[str], n_rows: int) -> go.Figure:
    """Side-by-side panels sharing the row axis (first row at the top), room right of each for its colour bar."""
    fig = make_subplots(rows=1, cols=len(titles), shared_yaxes=True, subplot_titles=list(titles),
                        horizontal_spacing=0.3 / len(titles))
    fig.update_yaxes(autorange="reversed", tickmode="array")
    fig.update_layout(height=_MARGIN_PIXELS + _ROW_PIXELS * n_rows, margin={"t": 110}, template="plotly_white")
    return fig


def _colorbar(fig: go.Figure, col: int, label: str) -> dict:
    """A colour bar just right of panel ``col`` (plotly puts every bar at the figure's right edge otherwise)."""
    domain = fig.get_subplot(1, col).xaxis.domain
    return {"x": domain[1] + 0.005, "xanchor": "left", "thickness": 10,
            "title": {"text": _escape(label), "side": "right"}}


def _trace_hover(trace, kind: str, score_name: str) -> list[list[str]]:
    """Hover text per (token, layer): token and position, kind and restored layers, score, indirect effect."""
    effect = trace.indirect_effect(kind)
    scores = trace.scores[kind]
    start, end = trace.subject_range
    verb = "corrupted" if trace.direction == "noising" else "restored"
    rows = []
    for position, token in enumerate(trace.tokens):
        subject = ", subject" if start <= position < end else ""
        where = f"<b>{_escape(repr(token))}</b> (position {position}{subject})"
        row = []
        for layer in range(trace.n_layers):
            layers = restored_layers(kind, layer, trace.n_layers, trace.window)
            span = f"layer {layer}" if len(layers) == 1 else f"layer {layer} (layers {layers[0]}–{layers[-1]} {verb})"
            row.append(f"{where}<br>{KIND_TITLES[kind]}, {span}"
                       f"<br>{_escape(score_name)} = {scores[position, layer]:.4g}"
                       f"<br>indirect effect = {effect[position, layer]:+.4g}")
        rows.append(row)
    return rows


def _average_hover(effect) -> list[list[str]]:
    """Hover text per (role, layer): role, kind and layer, AIE, mean restored score, score rows behind it."""
    rows = []
    for r, role in enumerate(effect.roles):
        row = []
        for layer in range(effect.effect.shape[1]):
            if effect.counts[r] == 0:
                row.append(f"<b>{role}</b><br>no fact had this role")
                continue
            row.append(f"<b>{role}</b><br>{KIND_TITLES[effect.kind]}, layer {layer}"
                       f"<br>AIE = {effect.effect[r, layer]:+.4g}"
                       f"<br>mean restored score = {effect.mean_scores[r, layer]:.4g}"
                       f"<br>{int(effect.counts[r])} score rows, {effect.n_facts} facts")
        rows.append(row)
    return rows


__all__ = ["interactive_trace", "interactive_average_effect"]
