"""Token rows for editing: a prompt's ids, where its subject ends, and batching by right padding.

Every editing computation reads or writes a hidden state at the subject's last token ("subject_last" in
ROME/MEMIT) of some prompt built from a template. Building those rows in one place keeps BOS policy,
subject location and padding identical for keys, targets and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass


from tracing.facts import SLOT, Fact, encode_fact


@dataclass(frozen=True)
class PromptRow:
    """Token ids of one prompt and the index of the subject's last token in them."""

    ids: tuple[int, ...]
    lookup: int

    def __len__(self) -> int:
        return len(self.ids)


def subject_row(model, template: str, subject: str) -> PromptRow:
    """The row for ``template`` (one ``{}`` slot) filled with ``subject``."""
    fact = Fact(subject=subject, template=template, target_true="-")
    encoded, (_, end) = encode_fact(model, fact)
    return PromptRow(encoded.ids, end - 1)


def in_context(context: str, template: str) -> str:
    """Put a request's template into a context template (``"Some text. {}"`` -> ``"Some text. {} is in"``)."""
    return context.replace(SLOT, template)


