"""Matplotlib figures for traces, in ROME's visual language.

Tokens run down the rows (subject tokens marked with ``*``), layers across the columns, one panel per
kind of state with ROME's colour maps (residual purple, MLP green, attention red). The colour scale is
in probability units and starts at the corrupted run's probability, so white means "restoring this
brought nothing back".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from tracing.io import atomic_path
from tracing.metrics import atp_space_label, metric_label

KIND_COLORMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 150,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
}


def token_labels(tokens: Sequence[str], subject_range: tuple[int, int]) -> list[str]:
    """Readable row labels: whitespace made visible, subject tokens starred (as in ROME's figures)."""
    labels = []
    for i, token in enumerate(tokens):
        label = token.replace("\n", "\\n").strip() or repr(token)
        if subject_range[0] <= i < subject_range[1]:
            label += "*"
        labels.append(label)
    return labels


def _layer_ticks(ax, n_layers: int, step: int | None = None) -> None:
    step = step or (5 if n_layers > 12 else 1)
    ticks = list(range(0, n_layers, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])


def draw_heatmap(ax, values: np.ndarray, row_labels: Sequence[str], kind: str, *, vmin: float | None,
                 vmax: float | None = None, cmap: str | None = None, colorbar_label: str = "",
                 title: str = "", xlabel: str = ""):
    """One heatmap panel with a colour bar; returns the image."""
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap or KIND_COLORMAPS[kind],
                      vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    _layer_ticks(ax, values.shape[1])
    ax.tick_params(length=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=7, length=2)
    if colorbar_label:
        bar.set_label(colorbar_label, fontsize=8)
    return image


def layer_axis_label(kind: str, window: int) -> str:
    """What a column of a ``kind`` panel means: one layer, or the centre of a window of layers."""
    if kind == "resid":
        return "single restored layer"
    return f"centre of {window} restored {'MLP' if kind == 'mlp' else 'attention'} layers"


def _panel_size(trace, margin: float) -> tuple[float, float]:
    """Inches of one heatmap panel: a column per layer, a row per token, plus ``margin`` for titles."""
    return 1.6 + 0.11 * trace.n_layers, margin + 0.24 * trace.n_tokens


def plot_trace(trace, kinds: Sequence[str] | None = None, title: str | None = None):
    """A figure with one panel per kind for a :class:`~tracing.causal_trace.FactTrace`; the title names
    the method, corruption, metric and direction (:func:`describe_trace`). Noising traces are drawn with
    the colour map reversed, so that dark still marks a state that matters."""
    kinds = list(kinds or trace.kinds)
    labels = token_labels(trace.tokens, trace.subject_range)
    width, height = _panel_size(trace, margin=1.3)
    noising = trace.direction == "noising"
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(width * len(kinds), height), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            draw_heatmap(ax, trace.scores[kind], labels, kind,
                         vmin=None if noising else trace.corrupted_prob, vmax=trace.clean_prob if noising else None,
                         cmap=KIND_COLORMAPS[kind] + "_r" if noising else None,
                         colorbar_label=metric_label(trace.metric, trace.answer, trace.counterfactual),
                         title=panel_title(trace, kind), xlabel=layer_axis_label(kind, trace.window))
        for ax in axes[0][1:]:
            ax.set_yticklabels([])
        fig.suptitle(title or trace_title(trace), fontsize=10, y=1.0)
        fig.tight_layout()
    return fig


def panel_title(trace, kind: str) -> str:
    """A panel's title: what was done to which state, e.g. "Restoring MLP output (AtP)"."""
    verb = "Corrupting" if trace.direction == "noising" else "Restoring"
    estimate = " (AtP)" if trace.method == "atp" else ""
    return f"{verb} {KIND_TITLES[kind]}{estimate}"


def trace_title(trace) -> str:
    """A trace figure's title: model, prompt, answer, clean and corrupted scores, and how it was made."""
    short = "p" if trace.metric == "prob" else "logit diff"
    return (f"{trace.model_name}: \"{trace.prompt}\" → {trace.answer.strip()!r}   "
            f"(clean {short}={trace.clean_prob:.2f}, corrupted {short}={trace.corrupted_prob:.2f})\n"
            + describe_trace(trace))


def describe_trace(trace) -> str:
    """How a trace was made, in one line: method, corruption, metric, direction."""
    method = "exact"
    if trace.method == "atp":
        method = f"attribution patching (linear in {atp_space_label(trace.atp_space, trace.metric)})"
    if trace.corruption == "symmetric":
        corruption = f"symmetric replacement by {trace.samples} subject(s) of equal token length"
    else:
        corruption = f"Gaussian noise σ={trace.noise:.3g}, {trace.samples} samples"
    metric = metric_label(trace.metric, trace.answer, trace.counterfactual)
    return f"{method} · {corruption} · {metric} · {trace.direction}"


def plot_average_effect(effects: Sequence, title: str | None = None):
    """Average indirect effect per token role and layer, one panel per kind (ROME Fig. 2 style).

    Values are clipped at 0 and all panels share one colour scale, as in ROME's roll-up figures.
    """
    clipped = [np.clip(np.nan_to_num(e.effect, nan=0.0), 0, None) for e in effects]
    vmax = max(float(c.max()) for c in clipped) or None
    with plt.rc_context(STYLE):
        n_layers = clipped[0].shape[1]
        fig, axes = plt.subplots(1, len(effects), figsize=((2.6 + 0.11 * n_layers) * len(effects), 2.6),
                                 squeeze=False)
        for ax, effect, values in zip(axes[0], effects, clipped):
            draw_heatmap(ax, values, effect.roles, effect.kind, vmin=0.0, vmax=vmax, colorbar_label="AIE",
                         title=f"Restoring {KIND_TITLES[effect.kind]}",
                         xlabel=layer_axis_label(effect.kind, effect.window))
        for ax in axes[0][1:]:
            ax.set_yticklabels([])
        fig.suptitle(title or f"Average indirect effect over {effects[0].n_facts} facts", fontsize=10)
        fig.tight_layout()
    return fig


def plot_critical_layers(critical, title: str | None = None):
    """The MLP indirect effect at the last subject token per layer, the chosen band shaded; the effect of
    restoring one layer alone beside it when it was traced."""
    curve = np.asarray(critical.curve)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 2.4))
        ax.axvspan(critical.layers[0] - 0.5, critical.layers[-1] + 0.5, color="#2ca02c", alpha=0.15,
                   label=f"critical layers {critical.layers[0]}–{critical.layers[-1]}")
        ax.plot(range(len(curve)), curve, color="#1b7837", marker="o", markersize=3, linewidth=1.5,
                label="window centred on the layer" if critical.single_layer_curve else None)
        if critical.single_layer_curve:
            single = np.asarray(critical.single_layer_curve)
            ax.plot(range(len(single)), single, color="#762a83", marker="s", markersize=3, linewidth=1.2,
                    linestyle="--", label="one layer restored")
        ax.set_xlabel("layer (centre of MLP window, or the one layer)" if critical.single_layer_curve
                      else "layer (centre of MLP window)")
        ax.set_ylabel("avg. indirect effect")
        ax.set_title(title or f"MLP effect at the last subject token ({critical.n_facts} facts)")
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically (format from the extension) and close the figure."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_trace_comparison(before, after, kinds: Sequence[str] | None = None, title: str | None = None):
    """Before/after heatmaps of indirect effect and their difference, one row per kind.

    ``before`` and ``after`` are traces of the same prompt (e.g. the true answer on the unedited model
    and the new answer on the edited one). Indirect effects (restored minus corrupted probability) put
    both on one scale; the difference column (red: the edited model relies on that state more) shows
    where the answer is read from after the edit.
    """
    if before.tokens != after.tokens:
        raise ValueError("before and after traces must be of the same prompt")
    kinds = list(kinds or [k for k in before.kinds if k in after.kinds])
    labels = token_labels(before.tokens, before.subject_range)
    width, height = _panel_size(before, margin=1.0)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(kinds), 3, figsize=(3 * width, height * len(kinds)), squeeze=False)
        for row, kind in zip(axes, kinds):
            effect_before, effect_after = before.indirect_effect(kind), after.indirect_effect(kind)
            top = max(float(effect_before.max()), float(effect_after.max()), 1e-6)
            name = KIND_TITLES[kind]
            draw_heatmap(row[0], effect_before, labels, kind, vmin=0.0, vmax=top,
                         colorbar_label="indirect effect",
                         title=f"before: p({before.answer.strip()}), {name}",
                         xlabel=layer_axis_label(kind, before.window))
            draw_heatmap(row[1], effect_after, labels, kind, vmin=0.0, vmax=top,
                         colorbar_label="indirect effect",
                         title=f"after: p({after.answer.strip()}), {name}",
                         xlabel=layer_axis_label(kind, after.window))
            difference = effect_after - effect_before
            # at least a tenth of the effect scale, so that rounding noise (an unchanged neighbour) stays white
            bound = max(float(np.abs(difference).max()), 0.1 * top)
            draw_heatmap(row[2], difference, labels, kind, vmin=-bound, vmax=bound, cmap="RdBu_r",
                         colorbar_label="after − before", title="difference",
                         xlabel=layer_axis_label(kind, after.window))
            for ax in row[1:]:
                ax.set_yticklabels([])
        fig.suptitle(title or f"{before.model_name}: \"{before.prompt}\"", fontsize=10)
        fig.tight_layout()
    return fig
