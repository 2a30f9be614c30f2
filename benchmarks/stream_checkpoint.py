"""Resumable lifelong streams: the editor and the stream's progress, saved every few calls.

A T = 1000 stream takes hours on two CPU cores; killed (or out of session time), it continues from its last
checkpoint instead of starting over. A checkpoint is a folder holding the editor's own save file
(``Editor.save``, atomic) and ``progress.json``, written after it, which names that file, how many facts
were edited, the editing seconds so far and the run it belongs to. A folder of another run (other method,
config, facts, batch or checkpoints) is refused, so a resumed stream is the stream that was started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tracing.io import atomic_path

PROGRESS = "progress.json"


@dataclass(frozen=True)
class StreamProgress:
    """Where a stream stood at its last checkpoint: ``edited`` facts in ``seconds`` of editing."""

    edited: int
    seconds: float
    editor_file: str


def run_key(name: str, config: Any, facts: Sequence, held_out: Sequence, batch: int, protocol: str,
            checkpoints: Sequence[int]) -> str:
    """A digest of everything that makes a stream what it is."""
    described = {
        "method": name,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "facts": [(f.subject, f.prompt, f.target_new) for f in facts],
        "held_out": [(f.subject, f.prompt) for f in held_out],
        "batch": batch, "protocol": protocol, "checkpoints": list(checkpoints),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()


def read_progress(folder: Path, key: str) -> StreamProgress | None:
    """The folder's progress, None when it holds none; a folder of another run is a ValueError."""
    path = folder / PROGRESS
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("run") != key:
        raise ValueError(f"{folder} holds a checkpoint of another stream (method, config, facts, batch or "
                         f"checkpoints differ); give another --resume folder or remove it")
    return StreamProgress(saved["edited"], saved["seconds"], saved["editor_file"])


def write_checkpoint(folder: Path, key: str, editor, edited: int, seconds: float) -> StreamProgress:
    """Save ``editor`` to a new file, then point ``progress.json`` at it (atomically), then drop older
    editor files: a kill at any moment leaves a consistent checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    editor_file = f"editor-{edited}.safetensors"
    editor.save(folder / editor_file)
    with atomic_path(folder / PROGRESS) as tmp:
        tmp.write_text(json.dumps({"run": key, "edited": edited, "seconds": seconds, "editor_file": editor_file}))
    for old in folder.glob("editor-*.safetensors"):
        if old.name != editor_file:
            old.unlink()
    return StreamProgress(edited, seconds, editor_file)


def load_checkpoint(folder: Path, progress: StreamProgress, name: str, model, config, facts: Sequence):
    """The saved editor on ``model``, checked to hold exactly the stream's first ``progress.edited`` facts."""
    from editing.editor import method

    editor = method(name).load(folder / progress.editor_file, model)
    editor.config = config  # weight editors do not save theirs; the run key says it is this one
    written = [(f.subject, f.prompt, f.target_new) for f in editor.facts]
    expected = [(f.subject, f.prompt, f.target_new) for f in facts[: progress.edited]]
    if written != expected:
        editor.undo()
        raise ValueError(f"{folder / progress.editor_file} does not hold the stream's first {progress.edited} facts")
    return editor


def clear(folder: Path) -> None:
    """Remove a finished stream's checkpoint (its rows are in the results file)."""
    for path in [folder / PROGRESS, *folder.glob("editor-*.safetensors")]:
        path.unlink(missing_ok=True)
