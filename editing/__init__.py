"""factlens editing: rewrite facts (MEMIT, ROME, WISE, GRACE) through one editor interface, and score them.

    from editing import create_editor, evaluate_counterfact
    editor = create_editor("memit", model)          # or "rome", "wise", "grace"; methods() lists them
    editor.edit(facts); evaluate_counterfact(model, facts); editor.undo()

Names are imported on first use (see :mod:`tracing` for the same pattern).
"""

from __future__ import annotations

from tracing.lazy import lazy_exports

_EXPORTS = {
    "Editor": "editing.editor",
    "Route": "editing.editor",
    "create_editor": "editing.editor",
    "load_editor": "editing.editor",
    "methods": "editing.editor",
    "MemitConfig": "editing.memit",
    "apply_memit": "editing.memit",
    "RomeConfig": "editing.rome",
    "apply_rome": "editing.rome",
    "WiseConfig": "editing.wise",
    "WiseEditor": "editing.wise",
    "WiseEasyEditConfig": "editing.wise",
    "GraceConfig": "editing.grace",
    "GraceEditor": "editing.grace",
    "WeightEdit": "editing.weights",
    "CorpusConfig": "editing.covariance",
    "key_second_moments": "editing.covariance",
    "StatsInfo": "editing.stats_file",
    "read_key_stats": "editing.stats_file",
    "evaluate_counterfact": "editing.evaluate",
    "evaluate_accuracy": "editing.evaluate",
    "evaluate_generated": "editing.generated_answers",
    "generated_baseline": "editing.generated_answers",
    "edit_and_score": "editing.protocol",
    "NoDataError": "editing.evaluate",
    "locality_predictions": "editing.evaluate",
    "markdown_table": "editing.evaluate",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
