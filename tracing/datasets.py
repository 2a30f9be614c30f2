"""Load an editing dataset by name (downloaded once into the cache) or from a local JSON file, as facts.

Four record shapes, told apart by their keys (:func:`detect_shape`):

* CounterFact (``requested_rewrite`` is one rewrite): ``counterfact``, ``multi_counterfact``;
* zsRE as MEND released it (``src``, ``alt``, ``answers``, ...): ``zsre``;
* MQuAKE (``requested_rewrite`` is a list, plus multi-hop ``questions``): ``mquake`` and its variants. Each
  rewrite is one fact; the multi-hop questions and answers are in :func:`mquake_cases`;
* KnowEdit (``subject``, ``prompt``, ``target_new``, ``ground_truth``, ``rephrase``/``rephrase_prompt``,
  ``locality``, ``portability``; WikiBio's ``concept``/``text``/``labels``): ``knowedit-*``.

Every record is checked before any fact is returned: a missing field, or a subject that is not in its
prompt, is reported with the dataset, the record's index and the field, all problems at once
(:class:`InvalidRecordError`), so nothing is edited from a half-read file. ``skip_invalid`` leaves such
records out with a warning that names them instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tracing.dataset_sources import DatasetSource, dataset_names, dataset_source
from tracing.download import DownloadError, download_hub_file, download_url
from tracing.facts import SLOT, Fact, InvalidRecordError, read_records

T = TypeVar("T")
SHOWN_PROBLEMS = 20  # an error lists this many bad records, then counts the rest


class DatasetUnavailableError(RuntimeError):
    """A registered dataset is not in the cache and cannot be downloaded now (the message says where to put it)."""


class UnknownDatasetError(ValueError):
    """Neither a registered dataset name nor an existing file."""


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE case: the rewrites to edit in together, and the multi-hop questions whose answer should
    change from ``answer`` to ``new_answer`` once they are (any question answered counts, in the paper)."""

    case_id: int
    edits: tuple[Fact, ...]
    questions: tuple[str, ...]
    answer: str
    new_answer: str
    answer_aliases: tuple[str, ...] = ()
    new_answer_aliases: tuple[str, ...] = ()


# --- files: the cache, downloads ------------------------------------------------------------------------


def datasets_dir() -> Path:
    from tracing.models import cache_dir  # torch-free callers (the command lines' checks) never get here

    return cache_dir() / "datasets"


def dataset_path(name: str) -> Path:
    """The local file of the registered dataset ``name``: the cached copy, downloaded first if missing.

    Raises :class:`DatasetUnavailableError`, within seconds, when it is not cached and cannot be
    downloaded; the message names the dataset, its URL and the exact path to put the file at."""
    source = _registered(name)
    target = datasets_dir() / source.file_name
    if target.is_file():
        return target
    try:
        if source.url is not None:
            download_url(source.url, target, description=source.name)
        else:
            download_hub_file(source.hub_repo, source.hub_file, target, endpoint=source.hub_endpoint)
    except DownloadError as error:
        raise DatasetUnavailableError(
            f"dataset {source.name!r} is not in the cache and could not be downloaded from {source.location}: "
            f"{error}. Download that file where there is network and put it at {target} (or pass the "
            "file's path instead of the name)") from error
    return target


def _registered(name: str) -> DatasetSource:
    source = dataset_source(name)
    if source is None:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    return source


# --- loading --------------------------------------------------------------------------------------------


def load_dataset(name_or_path: str | Path, limit: int | None = None, skip_invalid: bool = False) -> list[Fact]:
    """The facts of a registered dataset (by name, see :data:`tracing.dataset_sources.DATASETS`) or of a
    local JSON file in one of the four shapes (a list of records, or JSON lines).

    ``limit`` keeps the first ``limit`` records (an MQuAKE case gives one fact per rewrite). A ``str`` is
    looked up as a name first; a ``Path`` is always a file."""
    label, records, shape = _records(name_or_path)
    records = records[:limit]
    if shape == "mquake":
        return [fact for case in _converted(label, records, _mquake_case, skip_invalid) for fact in case.edits]
    return _converted(label, records, _CONVERTERS[shape], skip_invalid)


def mquake_cases(name_or_path: str | Path, limit: int | None = None,
                 skip_invalid: bool = False) -> list[MultiHopCase]:
    """MQuAKE's cases with their multi-hop questions (for portability scoring); see :class:`MultiHopCase`."""
    label, records, shape = _records(name_or_path)
    if shape != "mquake":
        raise ValueError(f"{label}: its records are {shape} records, not MQuAKE cases")
    return _converted(label, records[:limit], _mquake_case, skip_invalid)


def dataset_shape(name_or_path: str | Path) -> str:
    """The record shape of a registered dataset or local file (see :func:`detect_shape`); reads the file."""
    return _records(name_or_path)[2]


def _records(name_or_path: str | Path) -> tuple[str, list[dict[str, Any]], str]:
    """(label for messages, the records, their shape)."""
    source = dataset_source(str(name_or_path)) if isinstance(name_or_path, str) else None
    if source is not None:
        if source.shape is None:
            raise ValueError(f"dataset {source.name!r} cannot be loaded as facts: {source.note} "
                             f"(dataset_path({source.name!r}) downloads its file)")
        path, label = dataset_path(source.name), source.name
    else:
        path = Path(name_or_path).expanduser()
        label = str(path)
        if not path.exists():
            raise UnknownDatasetError(f"'{path}' is neither a file nor a dataset name (known: "
                                      f"{', '.join(dataset_names())})")
    records = read_records(path)
    if not isinstance(records, list) or any(not isinstance(record, dict) for record in records):
        raise ValueError(f"{label}: expected a JSON list of records (objects), or one object per line")
    if not records:
        return label, [], "counterfact"
    shape = detect_shape(records[0])
    if shape is None:
        raise ValueError(f"{label}: its records are neither CounterFact (requested_rewrite), zsRE (src), "
                         "MQuAKE (a list of requested_rewrite) nor KnowEdit (subject, prompt, target_new) records")
    if source is not None and source.shape != shape:
        raise ValueError(f"dataset {label!r} should hold {source.shape} records, but its file {path} holds "
                         f"{shape} records; delete it to download it again")
    return label, records, shape


def detect_shape(record: dict[str, Any]) -> str | None:
    """Which schema a record follows (``counterfact``, ``zsre``, ``mquake``, ``knowedit``), or None."""
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if rewrite is not None:
        return "counterfact"
    if "src" in record:
        return "zsre"
    if ("prompt" in record or "text" in record) and ("target_new" in record or "labels" in record):
        return "knowedit"
    return None


def _converted(label: str, records: Sequence[dict[str, Any]], convert: Callable[[dict, int], T],
               skip_invalid: bool) -> list[T]:
    """Convert every record, collecting the problems of all of them before refusing or skipping."""
    converted, problems = [], []
    for index, record in enumerate(records):
        try:
            converted.append(convert(record, index))
        except (InvalidRecordError, ValueError, TypeError) as error:
            problems.append(f"record {index}: {error}")
        except KeyError as error:  # a nested part the checks above do not look into
            problems.append(f"record {index}: missing field {error}")
    _report(label, problems, skip_invalid)
    return converted


def _report(label: str, problems: list[str], skip_invalid: bool) -> None:
    if not problems:
        return
    shown = problems[:SHOWN_PROBLEMS]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    if not skip_invalid:
        raise InvalidRecordError(f"dataset {label!r}: {len(problems)} record(s) cannot be read as facts; "
                                 "nothing was loaded:\n  " + "\n  ".join(shown))
    warnings.warn(f"dataset {label!r}: left out {len(problems)} record(s):\n  " + "\n  ".join(shown), stacklevel=4)


# --- field access with named errors ---------------------------------------------------------------------


def _field(record: dict[str, Any], path: str, prefix: str = "") -> Any:
    """``record``'s value at a dotted ``path`` (``requested_rewrite.target_true``); a missing or empty value
    raises :class:`InvalidRecordError` naming the field as ``prefix + path``."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise InvalidRecordError(f"missing field {prefix + path!r}")
        value = value[key]
    if value is None or (isinstance(value, (str, list)) and not value):
        raise InvalidRecordError(f"field {prefix + path!r} is empty")
    return value


def _text(record: dict[str, Any], path: str, prefix: str = "") -> str:
    """A text field. CounterFact's targets are ``{"str": ..., "id": ...}``; zsRE's and KnowEdit's answers
    and prompts may be (nested) lists of alternatives, of which the first is taken."""
    value = _field(record, path, prefix)
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecordError(f"field {prefix + path!r} is not a non-empty text ({value!r})")
    return value


def _template(prompt: str, subject: str, prompt_field: str, subject_field: str) -> str:
    """The prompt with ``{}`` where the subject first occurs."""
    if subject not in prompt:
        raise InvalidRecordError(f"field {subject_field!r} ({subject!r}) does not occur in field "
                                 f"{prompt_field!r} ({prompt!r})")
    return prompt.replace(subject, SLOT, 1)


def _checked_slot(template: str, subject: str, prefix: str) -> str:
    """A CounterFact-style prompt must hold exactly one ``{}`` where the subject goes."""
    if template.count(SLOT) != 1:
        raise InvalidRecordError(f"field '{prefix}prompt' ({template!r}) has no single '{{}}' slot for field "
                                 f"'{prefix}subject' ({subject!r})")
    return template


# --- the shapes -----------------------------------------------------------------------------------------


def _from_counterfact(record: dict[str, Any], index: int) -> Fact:
    prefix = "requested_rewrite."
    rewrite = _field(record, "requested_rewrite")
    _checked_slot(_text(rewrite, "prompt", prefix), _text(rewrite, "subject", prefix), prefix)
    _text(rewrite, "target_true", prefix)
    if isinstance(rewrite, dict) and rewrite.get("target_new") is not None:
        _text(rewrite, "target_new", prefix)
    return Fact.from_counterfact(record)


def _from_zsre(record: dict[str, Any], index: int) -> Fact:
    subject, question = _text(record, "subject"), _text(record, "src")
    _template(question, subject, "src", "subject")
    new, true = _text(record, "alt"), _text(record, "answers")
    if new.strip() == true.strip():
        raise InvalidRecordError(f"field 'alt' ({new!r}) is the true answer (field 'answers'); nothing to edit")
    return Fact.from_zsre(record, case_id=index)


def _from_knowedit(record: dict[str, Any], index: int) -> Fact:
    """A KnowEdit record. WikiBio names its fields ``concept``/``text``/``labels``; the knowledge-insertion
    subsets (wiki_recent, WikiBio) have no ``ground_truth``, so their facts' ``target_true`` is empty (their
    scores are the zsRE-style ones, which read only the new target). Portability probes are kept in
    ``extra["portability"]`` as {kind: [[prompt, answer], ...]}."""
    subject_field, prompt_field, target_field = (_named(record, usual, wikibio) for usual, wikibio in
                                                 (("subject", "concept"), ("prompt", "text"), ("target_new", "labels")))
    subject, prompt = _text(record, subject_field), _text(record, prompt_field)
    template = _template(prompt, subject, prompt_field, subject_field)
    rephrase = record.get("rephrase", record.get("rephrase_prompt")) or ()
    portability = _probes(record, "portability")
    return Fact(
        subject=subject,
        template=template,
        target_true=_text(record, "ground_truth") if record.get("ground_truth") else "",
        target_new=_text(record, target_field),
        paraphrases=(rephrase,) if isinstance(rephrase, str) else tuple(rephrase),
        locality=tuple(pair for pairs in _probes(record, "locality").values() for pair in pairs),
        case_id=index,
        extra={"portability": {kind: [list(pair) for pair in pairs] for kind, pairs in portability.items()}}
        if portability else {},
    )


def _named(record: dict[str, Any], usual: str, wikibio: str) -> str:
    """The key a KnowEdit record uses for one field: WikiBio's name only where the usual one is absent."""
    return wikibio if usual not in record and wikibio in record else usual


def _probes(record: dict[str, Any], key: str) -> dict[str, list[tuple[str, str]]]:
    """KnowEdit's ``locality``/``portability``, {kind: [{prompt, ground_truth}, ...]}, as
    {kind: [(prompt, first answer), ...]}."""
    groups = record.get(key) or {}
    if not isinstance(groups, dict):
        raise InvalidRecordError(f"field {key!r} is not an object of kinds ({type(groups).__name__})")
    probes = {}
    for kind, items in groups.items():
        items = items if isinstance(items, list) else [items]
        probes[kind] = [(_text(item, "prompt", f"{key}.{kind}.{i}."), _text(item, "ground_truth", f"{key}.{kind}.{i}."))
                        for i, item in enumerate(items)]
    return probes


def _mquake_case(record: dict[str, Any], index: int) -> MultiHopCase:
    case_id = record.get("case_id", index)
    edits = []
    for j, rewrite in enumerate(_field(record, "requested_rewrite")):
        prefix = f"requested_rewrite.{j}."
        subject = _text(rewrite, "subject", prefix)
        template = _checked_slot(_text(rewrite, "prompt", prefix), subject, prefix)
        question = rewrite.get("question")
        edits.append(Fact(subject=subject, template=template,
                          target_true=_text(rewrite, "target_true", prefix),
                          target_new=_text(rewrite, "target_new", prefix),
                          relation=rewrite.get("relation_id"), case_id=case_id,
                          extra={"rewrite": j, **({"question": question} if question else {})}))
    return MultiHopCase(
        case_id=case_id,
        edits=tuple(edits),
        questions=tuple(_field(record, "questions")),
        answer=_text(record, "answer"),
        new_answer=_text(record, "new_answer"),
        answer_aliases=tuple(record.get("answer_alias") or ()),
        new_answer_aliases=tuple(record.get("new_answer_alias") or ()),
    )


_CONVERTERS: dict[str, Callable[[dict, int], Fact]] = {
    "counterfact": _from_counterfact,
    "zsre": _from_zsre,
    "knowedit": _from_knowedit,
}
