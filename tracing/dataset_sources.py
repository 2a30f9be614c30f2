"""Editing datasets by name: where their maintainers publish each file, and which record shape it holds.

One table, so that a moved file is fixed in one line. The CounterFact and zsRE files come from the
ROME/MEMIT data folder (``REMOTE_ROOT_URL/data/dsets`` in kmeng01/rome and kmeng01/memit), MQuAKE from
its GitHub repository (princeton-nlp/MQuAKE, ``datasets/``), and the KnowEdit subsets from the Hugging
Face Hub (the dataset repository ``zjunlp/KnowEdit``, ``benchmark/``). Downloads land in
``<cache>/datasets/<name>.json`` (:func:`tracing.datasets.dataset_path`).

This module imports nothing heavy: command lines check a dataset name while parsing their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

ROME_DATA = "https://rome.baulab.info/data/dsets"
MQUAKE_DATA = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets"
KNOWEDIT_REPO = "zjunlp/KnowEdit"

SHAPES = ("counterfact", "zsre", "mquake", "knowedit")


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset file is published: a plain ``url``, or ``hub_file`` in the Hugging Face dataset
    repository ``hub_repo`` (``hub_endpoint``: another Hub than ``HF_ENDPOINT``'s, for mirrors and tests).
    ``shape`` names the record schema (one of :data:`SHAPES`), or is None for files that are not fact
    edits (their ``note`` says why)."""

    name: str
    shape: str | None
    url: str | None = None
    hub_repo: str | None = None
    hub_file: str | None = None
    hub_endpoint: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if (self.url is None) == (self.hub_file is None):
            raise ValueError(f"dataset {self.name!r}: give either a url or a hub file")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"dataset {self.name!r}: unknown shape {self.shape!r} (known: {', '.join(SHAPES)})")

    @property
    def file_name(self) -> str:
        return f"{self.name}.json"

    @property
    def location(self) -> str:
        """Where a person downloads the file by hand: the URL (a Hub file's ``resolve`` URL)."""
        if self.url is not None:
            return self.url
        endpoint = (self.hub_endpoint or "https://huggingface.co").rstrip("/")
        return f"{endpoint}/datasets/{self.hub_repo}/resolve/main/{self.hub_file}"


def _knowedit(name: str, file: str, shape: str | None = "knowedit", note: str = "") -> DatasetSource:
    return DatasetSource(name, shape, hub_repo=KNOWEDIT_REPO, hub_file=f"benchmark/{file}", note=note)


_NOT_FACTS = "its records name no subject inside a prompt, so they are not edit requests for subject-keyed editors"

DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in [
        DatasetSource("counterfact", "counterfact", url=f"{ROME_DATA}/counterfact.json"),
        DatasetSource("multi_counterfact", "counterfact", url=f"{ROME_DATA}/multi_counterfact.json"),
        DatasetSource("zsre", "zsre", url=f"{ROME_DATA}/zsre_mem_eval.json"),
        # MQuAKE-CF-3k-v2 is the maintainers' corrected 3k set (EasyEdit's MQuAKE loader reads it);
        # mquake-cf-3k is the file of the paper's tables.
        DatasetSource("mquake", "mquake", url=f"{MQUAKE_DATA}/MQuAKE-CF-3k-v2.json"),
        DatasetSource("mquake-cf-3k", "mquake", url=f"{MQUAKE_DATA}/MQuAKE-CF-3k.json"),
        DatasetSource("mquake-cf", "mquake", url=f"{MQUAKE_DATA}/MQuAKE-CF.json"),
        DatasetSource("mquake-t", "mquake", url=f"{MQUAKE_DATA}/MQuAKE-T.json"),
        _knowedit("knowedit-zsre", "ZsRE/ZsRE-test-all.json"),
        _knowedit("knowedit-wiki-counterfact", "wiki_counterfact/test_cf.json"),
        _knowedit("knowedit-wiki-recent", "wiki_recent/recent_test.json"),
        _knowedit("knowedit-wikibio", "WikiBio/wikibio-test-all.json"),
        _knowedit("knowedit-convsent", "Convsent/blender_test.json", None, f"ConvSent edits sentiment: {_NOT_FACTS}"),
        _knowedit("knowedit-sanitation", "trivia/trivia_qa_test.json", None,
                  f"Sanitation asks a model to forget answers: {_NOT_FACTS}"),
    ]
}


def normalised_name(name: str) -> str:
    """Dataset names ignore case and treat '_' and '-' alike (``multi-counterfact``, ``KnowEdit_ZsRE``)."""
    return name.strip().lower().replace("_", "-")


def dataset_source(name: str) -> DatasetSource | None:
    """The registered dataset called ``name`` (see :func:`normalised_name`), or None."""
    wanted = normalised_name(name)
    return next((source for source in DATASETS.values() if normalised_name(source.name) == wanted), None)


def dataset_names() -> list[str]:
    return list(DATASETS)
