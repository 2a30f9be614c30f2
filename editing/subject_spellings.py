"""How a subject is spelled in token ids, and where those spellings end in a batch of token rows.

BPE tokenisers spell a name differently at the start of a text, after a space or after punctuation
("Germany" vs " Germany"), so a subject has a few spellings: its tokens in the edit prompt, in each
context template, alone and after a space. The subject memory answers only where one of them ends.
"""

from __future__ import annotations

from typing import Sequence

from editing.prompts import in_context
from tracing.facts import Fact, encode_fact


def subject_spellings(model, fact: Fact, contexts: Sequence[str] = ("{}",)) -> list[tuple[int, ...]]:
    """The distinct token-id spellings of ``fact.subject``: in its prompt, in each of ``contexts`` (one
    ``{}`` slot for the prompt), alone and after a space (no BOS)."""
    spellings: list[tuple[int, ...]] = []
    for context in ("{}", *contexts):
        placed = Fact(subject=fact.subject, template=in_context(context, fact.template), target_true="-")
        encoded, (start, end) = encode_fact(model, placed)
        spellings.append(tuple(encoded.ids[start:end]))
    for text in (fact.subject, " " + fact.subject):
        spellings.append(tuple(model.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return list(dict.fromkeys(s for s in spellings if s))


class SpellingIndex:
    """Entries' spellings by their last token, to find every (row, position, entry) where a spelling of
    an entry's subject ends (the position of the subject's last token)."""

    def __init__(self, spellings: Sequence[Sequence[tuple[int, ...]]] = ()) -> None:
        self._by_last: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for entry, entry_spellings in enumerate(spellings):
            for spelling in entry_spellings:
                self._by_last.setdefault(spelling[-1], []).append((entry, tuple(spelling)))

    def matches(self, rows: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
        """Columns (rows, positions, entries) of every match, each (row, position, entry) once."""
        found: dict[tuple[int, int, int], None] = {}
        for r, row in enumerate(rows):
            for t, token in enumerate(row):
                for entry, spelling in self._by_last.get(token, ()):
                    n = len(spelling)
                    if t + 1 >= n and tuple(row[t + 1 - n: t + 1]) == spelling:
                        found[(r, t, entry)] = None
        columns = tuple(zip(*found)) or ((), (), ())
        return list(columns[0]), list(columns[1]), list(columns[2])
