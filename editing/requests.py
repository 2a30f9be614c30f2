"""Edit requests: facts with a new target, checked before any weight changes.

An edit request is a :class:`tracing.facts.Fact` whose ``target_new`` is set. Everything that can be
wrong with a batch of requests is detected here, up front, so an edit either applies completely or not
at all.
"""

from __future__ import annotations

from typing import Iterable

from tracing.facts import Fact, encode_fact
from tracing.tokens import SubjectNotFoundError, target_token_ids


class EditRequestError(ValueError):
    """A request cannot be edited (named in the message); no weight was changed."""


def validate_requests(model, facts: Iterable[Fact], earlier: Iterable[Fact] = ()) -> list[Fact]:
    """Return the requests as a list, or raise :class:`EditRequestError` naming every problem found.

    ``earlier``: the facts already written in this stream of edits (an editor's ``facts``); a request for
    the same subject and relation with another target conflicts with them too (undo, or start a new
    editor, to change an edit). Targets are compared after :func:`_normalised` (surrounding whitespace does
    not count: the edit writes the target's tokens after one space either way); messages quote the values
    as given (repr).
    """
    facts = list(facts)
    if not facts:
        raise EditRequestError("no edit requests given")
    problems: list[str] = []
    targets: dict[tuple[str, str], str] = {_key(fact): fact.target_new for fact in earlier}
    streamed = set(targets)
    for i, fact in enumerate(facts):
        case = f", case {fact.case_id}" if fact.case_id is not None else ""
        where = f"request {i} ({fact.subject!r}{case})"
        if fact.target_new is None or not _normalised(fact.target_new):
            problems.append(f"{where}: empty target_new {fact.target_new!r}")
            continue
        if _normalised(fact.target_new) == _normalised(fact.target_true):
            problems.append(f"{where}: target_new {fact.target_new!r} is the true target {fact.target_true!r}; "
                            "there is nothing to edit")
            continue
        try:
            encode_fact(model, fact)
            target_token_ids(model, fact.target_new)
        except (SubjectNotFoundError, ValueError) as error:
            problems.append(f"{where}: {error}")
            continue
        previous = targets.setdefault(_key(fact), fact.target_new)
        if _normalised(previous) != _normalised(fact.target_new):
            if _key(fact) in streamed:
                problems.append(f"{where}: already edited to {previous!r} earlier in this stream, now "
                                f"{fact.target_new!r} (undo, or start a new editor, to change an edit)")
            else:
                problems.append(f"{where}: conflicting targets for the same subject and relation: "
                                f"{previous!r} vs {fact.target_new!r}")
    if problems:
        raise EditRequestError("refusing to edit; nothing was changed:\n  " + "\n  ".join(problems))
    return facts


def _key(fact: Fact) -> tuple[str, str]:
    """What makes two requests the same edit: the subject and the relation (or template)."""
    return _normalised(fact.subject), fact.relation or fact.template


def _normalised(target: str) -> str:
    """What two targets are compared by: the text without surrounding whitespace."""
    return target.strip()
