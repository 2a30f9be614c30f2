"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    The temporary file lives in the same folder so the final ``os.replace`` is a rename on one file
    system, which POSIX and Windows both make atomic. On error the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def save_tensors_atomic(path: str | os.PathLike, tensors: dict, key: str, meta: Any) -> Path:
    """Write ``tensors`` to a safetensors file with ``meta`` as JSON under metadata ``key``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(meta)})
    return path


def load_tensors(path: str | os.PathLike, key: str) -> tuple[dict, Any]:
    """The tensors of a file written by :func:`save_tensors_atomic`, and its metadata under ``key``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if key not in metadata:
            raise ValueError(f"{path} is not a {key!r} file (its metadata has no {key!r} entry)")
        return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(metadata[key])
