"""The MLP layers an edit writes into, as a value that remembers where it came from.

``locate()`` returns one (``source="traced"``); :func:`critical_layers_for` finds the last one saved for a
model (the user's cache written by ``python -m tracing.locate``, then the result packaged with factlens, then
the paper's layers for GPT-J / GPT-2 XL). MEMIT takes either (``MemitConfig(layers=...)``) and every edit
records the layers and their source.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tracing.facts import DATA_DIR
from tracing.io import write_json_atomic
from tracing.models import cache_dir, model_spec

SOURCES = ("traced", "cached trace", "packaged trace", "paper", "given")


@dataclass(frozen=True)
class LayerSet:
    """Layers to edit (ascending) and their provenance: ``source`` is one of :data:`SOURCES`, ``detail``
    says more (how many facts were traced, which file)."""

    layers: tuple[int, ...]
    source: str = "given"
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a layer set needs at least one layer")
        if any(not isinstance(layer, int) or layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be non-negative integers, got {self.layers}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def as_record(self) -> dict:
        return dataclasses.asdict(self) | {"layers": list(self.layers)}


def cached_path(model_name: str) -> Path:
    return cache_dir() / "critical_layers" / f"{model_name.replace('/', '__')}.json"


def packaged_path(model_name: str) -> Path:
    return DATA_DIR / f"critical_layers_{model_name.replace('/', '__')}.json"


def save_critical_layers(critical, model_name: str, path: Path | None = None) -> Path:
    """Write a :class:`~tracing.average.CriticalLayers` where :func:`critical_layers_for` finds it."""
    path = path or cached_path(model_name)
    write_json_atomic(path, {"model": model_name, **dataclasses.asdict(critical)})
    return path


def critical_layers_for(model) -> LayerSet | None:
    """The layers tracing found for this model (cache first, then the packaged result, then the paper's);
    None where none is known."""
    spec = model_spec(model)
    for path, source in ((cached_path(spec.name), "cached trace"), (packaged_path(spec.name), "packaged trace")):
        if path.is_file():
            record = json.loads(path.read_text())
            detail = f"{path.name}, {record.get('n_facts', '?')} facts, {record.get('method', '?')}"
            return LayerSet(tuple(record["layers"]), source, detail)
    return LayerSet(spec.paper_layers, "paper", spec.name) if spec.paper_layers else None
