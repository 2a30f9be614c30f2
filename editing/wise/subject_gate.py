"""WISE's subject gate (``route_match="subject"``): a position may reach a side memory only once the tokens
so far spell a subject edited into that memory.

One linear memory's activation score does not keep other facts of the edited relations out as edits
accumulate (docs/wise.md): at T = 50 in one shard, the calibrated floor sat above most edits' scores. The
subject memory met the same problem and solved it with the subject's spelling in token ids
(:mod:`editing.subject_spellings`); here the spelling decides which memories are eligible, and among those
the activation score and its threshold still decide, as before. With ``relation_similarity`` the
relation check (:mod:`editing.relation_keys`) narrows a match further: its memory is eligible only from the
first later position that asks the edit's relation.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Sequence

import torch

from editing.subject_spellings import SpellingIndex

Passes = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def memory_owners(sizes: Sequence[int]) -> list[int]:
    """Which memory holds each edit, in edit order, for memories holding ``sizes`` edits each: memories
    hold consecutive runs of edits (shards are filled in order; a merge joins neighbouring shards)."""
    return [memory for memory, size in enumerate(sizes) for _ in range(size)]


class SubjectGate:
    """Per edit, the spellings of its subject and the memory that holds it; tells which memories each
    position of a batch of token rows may reach."""

    def __init__(self, spellings: Sequence[Sequence[tuple[int, ...]]], owners: Sequence[int],
                 n_memories: int, continuing: AbstractSet[int] = frozenset()) -> None:
        if len(spellings) != len(owners):
            raise ValueError(f"{len(spellings)} edits have spellings but the memories hold {len(owners)}")
        self.index = SpellingIndex(spellings, continuing)
        self.owners = torch.tensor(list(owners), dtype=torch.long)
        self.n_memories = n_memories

    def eligible(self, rows: Sequence[Sequence[int]], width: int | None = None, device=None,
                 passes: Passes | None = None) -> torch.Tensor:
        """(memories, rows, width) booleans: position t of a row may reach a memory once a spelling of one
        of its subjects has ended at or before t (causal: later tokens never change an earlier position).
        ``passes(rows, positions, edits)``: for each match (a spelling of an edit's subject ending at a
        position of a row), the (matches, width) positions where it may answer (the relation check)."""
        width = max((len(row) for row in rows), default=0) if width is None else width
        hits = torch.zeros(self.n_memories, len(rows), width, dtype=torch.int32)
        matched_rows, positions, entries = self.index.matches(rows)
        if not entries:
            return hits.bool().to(device)
        matched_rows, positions, entries = (torch.tensor(column, dtype=torch.long)
                                            for column in (matched_rows, positions, entries))
        if passes is None:
            hits[self.owners[entries], matched_rows, positions] = 1
            return (hits.cumsum(-1) > 0).to(device)
        allowed = passes(matched_rows, positions, entries).to("cpu", torch.int32)
        hits.index_put_((self.owners[entries], matched_rows), allowed[:, :width], accumulate=True)
        return (hits > 0).to(device)

    def reaches(self, rows: Sequence[Sequence[int]], passes: Passes | None = None) -> torch.Tensor:
        """(memories, rows) booleans: whether a row's last token may reach each memory."""
        if not rows:
            return torch.zeros(self.n_memories, 0, dtype=torch.bool)
        last = torch.tensor([len(row) - 1 for row in rows])
        return self.eligible(rows, passes=passes)[:, torch.arange(len(rows)), last]
