"""MEMIT's context templates: the bare prompt plus short model-written texts that end where the prompt
begins, so targets and keys hold in context rather than only at the start of a text (used by MEMIT's
targets and keys, and by WISE's edit rows)."""

from __future__ import annotations

from typing import Sequence

from tracing.facts import SLOT
from tracing.state import text_cache


def context_templates(model, prefixes: Sequence[str], length: int, seed: int) -> list[list[str]]:
    """``[["{}"], generated]``: one text per prefix, ``length`` tokens with the prefix, each ending in
    ``". {}"``. Cached per model (they depend only on the model, the prefixes, the length and the seed)."""
    from editing.generate import sample_continuations

    key = (tuple(prefixes), length, seed)
    cache = text_cache(model, "context_templates")
    if key not in cache:
        lengths = [length - len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prefixes]
        texts = []
        for prefix, count in zip(prefixes, lengths):
            texts += sample_continuations(model, [prefix], max(1, count), top_k=5, seed=seed)
        generated = [text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". " + SLOT
                     for text in texts]
        cache[key] = [[SLOT], generated]
    return cache[key]
