"""How a subject is spelled in token ids, and where those spellings end in a batch of token rows.

BPE tokenisers spell a name differently at the start of a text, after a space or after punctuation
("Germany" vs " Germany"), so a subject has a few spellings: its tokens in the edit prompt, in each
context template, alone and after a space. The subject memory answers only where one of them ends, and
only where the name ends there too: "Guinea" inside "Guinea-Bissau" or "Niger" inside "Nigerian" is
another name, told by the token after it (:func:`word_continuations`).
"""

from __future__ import annotations

import weakref
from typing import AbstractSet, Sequence

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


_CONTINUATIONS: "weakref.WeakKeyDictionary[object, frozenset[int]]" = weakref.WeakKeyDictionary()


def word_continuations(tokenizer) -> frozenset[int]:
    """Ids of the tokens that go on with the word before them: their text starts with a letter, a digit,
    a hyphen or a partial UTF-8 byte (no leading space or punctuation). A subject's spelling followed by
    one of them ends inside a longer name. Read once per tokenizer (one decode of the vocabulary)."""
    try:
        return _CONTINUATIONS[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    found = frozenset(i for i, text in enumerate(texts) if text and (text[0].isalnum() or text[0] in "-\ufffd"))
    try:
        _CONTINUATIONS[tokenizer] = found
    except TypeError:  # a tokenizer that cannot be weakly referenced is read again next time
        pass
    return found


class SpellingIndex:
    """Entries' spellings by their last token, to find every (row, position, entry) where a spelling of
    an entry's subject ends (the position of the subject's last token). ``continuing``: token ids after
    which the name goes on (:func:`word_continuations`); a spelling followed by one is no match."""

    def __init__(self, spellings: Sequence[Sequence[tuple[int, ...]]] = (),
                 continuing: AbstractSet[int] = frozenset()) -> None:
        self._continuing = continuing
        self._by_last: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for entry, entry_spellings in enumerate(spellings):
            for spelling in entry_spellings:
                self._by_last.setdefault(spelling[-1], []).append((entry, tuple(spelling)))

    def matches(self, rows: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
        """Columns (rows, positions, entries) of every match, each (row, position, entry) once."""
        found: dict[tuple[int, int, int], None] = {}
        for r, row in enumerate(rows):
            for t, token in enumerate(row):
                candidates = self._by_last.get(token)
                if not candidates or (t + 1 < len(row) and row[t + 1] in self._continuing):
                    continue
                for entry, spelling in candidates:
                    n = len(spelling)
                    if t + 1 >= n and tuple(row[t + 1 - n: t + 1]) == spelling:
                        found[(r, t, entry)] = None
        columns = tuple(zip(*found)) or ((), (), ())
        return list(columns[0]), list(columns[1]), list(columns[2])
