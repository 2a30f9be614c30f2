"""factlens tracing: find where a language model stores a fact (causal tracing, ROME).

The ground floor that tracing and editing both stand on: ``models`` (loading), ``adapter`` (hook names),
``tokens``, ``facts``, ``io``, ``blocks``, ``hooks``, ``activations``, ``state``, ``layer_set``. On top:
``noise``, ``engine``, ``causal_trace``, ``average``, ``locate``, ``plot``, ``interactive`` and the command
lines.

    from tracing import load_model, trace_prompt, plot_trace
    model = load_model()
    plot_trace(trace_prompt(model, "The Eiffel Tower is located in the city of", "Eiffel Tower"))

Names are imported on first use, so ``python -m tracing.heatmap --help`` does not load torch.
"""

from __future__ import annotations

from tracing.lazy import lazy_exports

_EXPORTS = {
    "load_model": "tracing.models",
    "TraceConfig": "tracing.causal_trace",
    "FactTrace": "tracing.causal_trace",
    "trace_prompt": "tracing.causal_trace",
    "trace_fact": "tracing.causal_trace",
    "choose_engine": "tracing.causal_trace",
    "plot_trace": "tracing.plot",
    "plot_trace_comparison": "tracing.plot",
    "plot_average_effect": "tracing.plot",
    "interactive_trace": "tracing.interactive",
    "interactive_average_effect": "tracing.interactive",
    "Fact": "tracing.facts",
    "known_facts": "tracing.facts",
    "load_facts": "tracing.facts",
    "load_dataset": "tracing.datasets",
    "locate": "tracing.locate",
    "LayerSet": "tracing.layer_set",
    "critical_layers_for": "tracing.layer_set",
    "average_indirect_effect": "tracing.average",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
