"""Key-statistics files that describe themselves, so C0 measured once can be shared and loaded from a path.

A file holds the running sum ``mom2`` = Σ k kᵀ over the corpus' tokens and their ``count`` (C0 is the
quotient), and, as safetensors metadata, a :class:`StatsInfo`: which model and layer, which corpus and how
much of it, the dtype and the format version. :func:`load_key_stats` refuses a file of another model or
layer with a message that says what the file holds, instead of editing with the wrong statistics.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch

from tracing.io import load_tensors, save_tensors_atomic

METADATA_KEY = "factlens_key_stats"
FORMAT_VERSION = 1


class StatsMismatchError(ValueError):
    """A statistics file that is not for this model and layer (or not a statistics file at all)."""


@dataclass(frozen=True)
class StatsInfo:
    """What a key-statistics file measured."""

    model: str
    layer: int
    d_mlp: int
    corpus: str  # corpus_id: "model-sampled-seed0", "hf-wikitext", "<file stem>-<content hash>"
    source: str  # as the user gave it: "model", "hf:wikitext", a path
    texts: int  # texts that contributed tokens
    tokens: int  # tokens summed over (the count C0 divides by)
    max_tokens: int  # cap on each text's length in tokens
    token_budget: int | None  # cap on all tokens together, if any
    dtype: str = "float32"  # of the stored sum
    model_dtype: str = "float32"
    version: int = FORMAT_VERSION
    factlens: str = "unknown"

    def describe(self) -> str:
        return (f"C0 of {self.model} layer {self.layer} (d_mlp {self.d_mlp}) over {self.texts} texts / "
                f"{self.tokens} tokens of corpus {self.corpus}")


def factlens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("factlens")
    except PackageNotFoundError:
        return "unknown"


def save_key_stats(path: str | os.PathLike, mom2_sum: torch.Tensor, info: StatsInfo) -> Path:
    """Write one layer's sum and count with ``info`` as metadata, atomically."""
    tensors = {"mom2": mom2_sum.contiguous(), "count": torch.tensor(float(info.tokens))}
    return save_tensors_atomic(path, tensors, METADATA_KEY, dataclasses.asdict(info))


def read_key_stats(path: str | os.PathLike) -> tuple[torch.Tensor, StatsInfo]:
    """C0 (float32, d_mlp x d_mlp) and the description of a file written by :func:`save_key_stats`."""
    try:
        tensors, record = load_tensors(path, METADATA_KEY)
    except ValueError as error:
        raise StatsMismatchError(f"'{path}' does not describe itself as factlens key statistics ({error}); "
                                 "files written before version 1 can only be used from the cache") from None
    except Exception as error:  # safetensors raises its own types for files that are not safetensors
        raise StatsMismatchError(f"'{path}' is not a key-statistics file ({type(error).__name__}: {error})") from None
    fields = {f.name for f in dataclasses.fields(StatsInfo)}
    info = StatsInfo(**{k: v for k, v in record.items() if k in fields})
    if info.version > FORMAT_VERSION:
        raise StatsMismatchError(f"'{path}' has statistics format {info.version}; this factlens reads up to "
                                 f"{FORMAT_VERSION} (upgrade factlens)")
    return tensors["mom2"] / tensors["count"], info


def load_key_stats(path: str | os.PathLike, model_name: str, layers: Collection[int],
                   d_mlp: int) -> tuple[torch.Tensor, StatsInfo]:
    """:func:`read_key_stats`, refusing a file of another model or width, or of a layer not in ``layers``."""
    c0, info = read_key_stats(path)
    wanted = ", ".join(map(str, sorted(layers)))
    if info.model != model_name or info.layer not in layers or info.d_mlp != d_mlp or tuple(c0.shape) != (d_mlp, d_mlp):
        raise StatsMismatchError(f"'{path}' holds {info.describe()}, not statistics of {model_name} "
                                 f"(d_mlp {d_mlp}) layer {wanted}; measure those with "
                                 f"`python -m editing.key_stats {model_name} --layers {wanted.replace(' ', '')}`")
    return c0, info
