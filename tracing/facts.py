"""Facts: the (subject, relation prompt, answer) records that tracing locates and editing rewrites.

One record type, :class:`Fact`, serves both stages. It reads and writes the CounterFact schema
(``requested_rewrite{prompt, subject, target_new{str}, target_true{str}}``, ``paraphrase_prompts``,
``neighborhood_prompts``, ``generation_prompts``) and reads the zsRE schema of MEND's release
(``src, subject, alt, answers, rephrase, loc, loc_ans``) as EasyEdit and WISE edit it (``alt`` is the new
target, ``answers[0]`` the true one). The bundled ``known_facts.json`` is CounterFact
shaped, holds only facts the embedded model gets right, and is rebuilt by
``python -m tracing.build_known_facts``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tracing.io import write_json_atomic
from tracing.tokens import EncodedPrompt, SubjectNotFoundError, encode_with_offsets, subject_token_range

SLOT = "{}"


@dataclass(frozen=True)
class Fact:
    """A fact ``template.format(subject) -> target_true``, optionally with a counterfactual target.

    ``template`` holds ``{}`` where the subject goes. ``paraphrases`` and ``neighborhood`` are full
    prompts (subject already filled in), as in CounterFact; ``locality`` holds (prompt, answer) pairs
    with their own answers, as zsRE's ``loc``/``loc_ans``.
    """

    subject: str
    template: str
    target_true: str
    target_new: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    relation: str | None = None
    case_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.template.count(SLOT) != 1:
            raise ValueError(f"template must contain exactly one '{{}}' slot: {self.template!r}")
        if not self.subject.strip():
            raise ValueError("a fact needs a non-empty subject")

    @property
    def prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace(SLOT, self.subject)

    @property
    def prompts_read(self) -> tuple[str, ...]:
        """Every prompt an evaluation of this fact reads: prompt, paraphrases, neighbourhood, locality."""
        return (self.prompt, *self.paraphrases, *self.neighborhood, *(prompt for prompt, _ in self.locality))

    @property
    def subject_char_start(self) -> int:
        return self.template.index(SLOT)

    def with_target_new(self, target_new: str) -> "Fact":
        from dataclasses import replace

        return replace(self, target_new=target_new)

    # --- CounterFact schema ------------------------------------------------------------------------
    def to_counterfact(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "requested_rewrite": {
                "prompt": self.template,
                "subject": self.subject,
                "target_true": {"str": self.target_true},
                "target_new": {"str": self.target_new} if self.target_new is not None else None,
                "relation_id": self.relation,
            },
            "paraphrase_prompts": list(self.paraphrases),
            "neighborhood_prompts": list(self.neighborhood),
            "generation_prompts": list(self.generation_prompts),
        }
        if self.case_id is not None:
            record = {"case_id": self.case_id, **record}
        if self.locality:
            record["locality"] = [{"prompt": p, "answer": a} for p, a in self.locality]
        record.update(self.extra)
        return record

    @classmethod
    def from_counterfact(cls, record: dict[str, Any]) -> "Fact":
        rewrite = record["requested_rewrite"]
        new = rewrite.get("target_new")
        known = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                 "generation_prompts", "locality"}
        return cls(
            subject=rewrite["subject"],
            template=rewrite["prompt"],
            target_true=_target_str(rewrite["target_true"]),
            target_new=_target_str(new) if new else None,
            paraphrases=tuple(record.get("paraphrase_prompts", ())),
            neighborhood=tuple(_prompt_str(p) for p in record.get("neighborhood_prompts", ())),
            generation_prompts=tuple(record.get("generation_prompts", ())),
            locality=tuple((d["prompt"], d["answer"]) for d in record.get("locality", ())),
            relation=rewrite.get("relation_id"),
            case_id=record.get("case_id"),
            extra={k: v for k, v in record.items() if k not in known},
        )

    # --- zsRE schema ---------------------------------------------------------------------------------
    @classmethod
    def from_zsre(cls, record: dict[str, Any], case_id: int | None = None) -> "Fact":
        """zsRE as MEND distributes it and EasyEdit/WISE edit it: the question ``src`` is the prompt,
        ``alt`` the new target, ``answers[0]`` the true one, ``rephrase`` the paraphrase, and ``loc`` /
        ``loc_ans`` one locality pair, its prompt in the published format (:func:`zsre_locality_prompt`).

        A record without ``alt``, or whose ``alt`` is its true answer, has nothing to edit: it is refused
        with :class:`InvalidRecordError` naming it (falling back to ``answers[0]`` would edit a fact to itself).
        """
        subject, question = record["subject"], record["src"]
        name = _record_name(record, case_id)
        if subject not in question:
            raise SubjectNotFoundError(f"zsRE {name}: subject {subject!r} does not occur in question {question!r}")
        new, answers = record.get("alt"), record.get("answers") or []
        if not isinstance(new, str) or not new.strip():
            raise InvalidRecordError(f"zsRE {name}: no new target ('alt' is {new!r})")
        if not answers or not str(answers[0]).strip():
            raise InvalidRecordError(f"zsRE {name}: no true answer ('answers' is {answers!r})")
        if new.strip() == str(answers[0]).strip():
            raise InvalidRecordError(f"zsRE {name}: the new target 'alt' {new!r} is the true answer "
                                     f"answers[0]; there is nothing to edit")
        rephrase = record.get("rephrase")
        locality = ()
        if record.get("loc") and record.get("loc_ans"):
            locality = ((zsre_locality_prompt(record["loc"]), record["loc_ans"]),)
        return cls(
            subject=subject,
            template=question.replace(subject, SLOT, 1),
            target_true=str(answers[0]),
            target_new=new,
            paraphrases=(rephrase,) if rephrase else (),
            locality=locality,
            relation="zsre",
            case_id=case_id if case_id is not None else record.get("case_id"),
        )


class InvalidRecordError(ValueError):
    """A dataset record cannot become an edit request (the message names it)."""


def zsre_locality_prompt(loc: str) -> str:
    """zsRE's locality question in its published format, as ROME and MEMIT score it: the record's
    ``loc`` verbatim (``"nq question: who played ..."``) with the question mark the data leaves off.

    Removing the ``"nq question: "`` prefix and the ``?`` would measure locality on a prompt format the
    dataset never uses (and in which WISE's router looks better than in the published one)."""
    loc = loc.rstrip()
    return loc if loc.endswith("?") else loc + "?"


def _record_name(record: dict[str, Any], case_id: int | None) -> str:
    """How an error message names a record: its position or case id, and its subject."""
    number = case_id if case_id is not None else record.get("case_id")
    where = f"record {number}" if number is not None else "record"
    return f"{where} ({record.get('subject')!r})"


def _target_str(target: Any) -> str:
    return target["str"] if isinstance(target, dict) else str(target)


def _prompt_str(prompt: Any) -> str:
    return prompt["prompt"] if isinstance(prompt, dict) else str(prompt)


def fact_from_prompt(prompt: str, subject: str, target_true: str, target_new: str | None = None) -> Fact:
    """Build a :class:`Fact` from a prompt that already contains the subject (first occurrence)."""
    subject = subject.strip()
    if not subject:
        raise SubjectNotFoundError("the subject is empty")
    start = prompt.find(subject)
    if start < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    template = prompt[:start] + SLOT + prompt[start + len(subject):]
    return Fact(subject=subject, template=template, target_true=target_true, target_new=target_new)


def encode_fact(model, fact: Fact) -> tuple[EncodedPrompt, tuple[int, int]]:
    """Tokenise ``fact.prompt`` and locate its subject tokens (half-open range)."""
    encoded = encode_with_offsets(model, fact.prompt)
    return encoded, subject_token_range(encoded, fact.subject, fact.subject_char_start)


# --- loading and saving -------------------------------------------------------------------------------


def load_counterfact(path: str | Path, limit: int | None = None) -> list[Fact]:
    records = read_records(path)
    return [Fact.from_counterfact(r) for r in records[:limit]]


def load_zsre(path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> list[Fact]:
    """zsRE records as facts (:meth:`Fact.from_zsre`); see :func:`zsre_facts` for ``skip_invalid``."""
    return zsre_facts(read_records(path)[:limit], skip_invalid)


def zsre_facts(records: Sequence[dict[str, Any]], skip_invalid: bool = False) -> list[Fact]:
    """Facts from zsRE records (``case_id`` = position). Records with nothing to edit (no ``alt``, or
    ``alt`` equal to the true answer) are refused together, each named; ``skip_invalid`` leaves them out
    with a warning that names them instead."""
    facts, problems = [], []
    for i, record in enumerate(records):
        try:
            facts.append(Fact.from_zsre(record, case_id=i))
        except InvalidRecordError as error:
            problems.append(str(error))
    if problems and not skip_invalid:
        raise InvalidRecordError(f"{len(problems)} zsRE record(s) cannot be edited:\n  " + "\n  ".join(problems))
    if problems:
        warnings.warn(f"left out {len(problems)} zsRE record(s):\n  " + "\n  ".join(problems), stacklevel=2)
    return facts


def load_facts(path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> list[Fact]:
    """Load CounterFact- or zsRE-format JSON (list of records, or JSON lines), detected from the keys
    (``skip_invalid``: see :func:`zsre_facts`)."""
    records = read_records(path)
    if not records:
        return []
    if "requested_rewrite" in records[0]:
        return [Fact.from_counterfact(r) for r in records[:limit]]
    if "src" in records[0]:
        return zsre_facts(records[:limit], skip_invalid)
    raise ValueError(f"{path}: records are neither CounterFact (requested_rewrite) nor zsRE (src) format")


def save_facts(facts: Iterable[Fact], path: str | Path) -> None:
    write_json_atomic(path, [f.to_counterfact() for f in facts])


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON file: a list of objects, or one object per line (JSON lines)."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


DATA_DIR = Path(__file__).parent / "data"
KNOWN_FACTS_FILE = "known_facts.json"


def spread(facts: Sequence[Fact], n: int) -> list[Fact]:
    """``n`` facts taken evenly over the list (the bundled file groups facts by relation, so this samples
    every relation instead of the first one)."""
    if n >= len(facts):
        return list(facts)
    step = len(facts) / n
    return [facts[int(i * step)] for i in range(n)]


def one_per_subject(facts: Iterable[Fact]) -> list[Fact]:
    """The first fact of each subject. Batch edits need this: MEMIT writes one key per subject (its last
    token's representation), so two facts about one subject in a batch compete for the same key."""
    seen: set[str] = set()
    return [f for f in facts if not (f.subject in seen or seen.add(f.subject))]


def known_facts(limit: int | None = None, relation: str | None = None) -> list[Fact]:
    """Facts the embedded model (SmolLM2-135M) predicts correctly, bundled with the package."""
    text = (DATA_DIR / KNOWN_FACTS_FILE).read_text(encoding="utf-8")
    facts = [Fact.from_counterfact(r) for r in json.loads(text)]
    if relation is not None:
        facts = [f for f in facts if f.relation == relation]
    return facts[:limit]


def evaluated_prompts() -> set[str]:
    """Every prompt a bundled record reads: its prompt, paraphrases, neighbourhood and locality prompts.
    Whatever an editor trains or calibrates on must stay out of this set, or the evaluation of the
    bundled facts would measure memorisation."""
    return {prompt for fact in known_facts() for prompt in fact.prompts_read}
