"""Atomic file writes: a reader sees the old file or the new one, never half of one, and no save leaves
temporaries behind for long.

Every file factlens writes goes through :func:`atomic_path` (one file) or :func:`atomic_dir` (a folder).
The new content is written inside a private temporary folder next to the target,
``.<name>.<pid>.<random>.tmp``, and renamed over the target when complete: a rename on one file system,
which POSIX and Windows both make atomic. Writers may create their own temporaries (safetensors writes a
``.tmpXXXXXX`` and renames it); inside the private folder those go when it goes.

A process killed mid-save (SIGKILL, power loss) cannot clean up after itself, so every save first removes
the stale temporaries of earlier saves in its folder (:func:`remove_stale_temporaries`): ours whose owning
process is dead (its pid is in the name), and those of earlier versions of this module and of safetensors
(``.<name>.XXXXXXXX.tmp``, ``.tmpXXXXXX``) once they are older than a minute.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# .<target name>.<pid>.<8 hex digits>.tmp: a file or folder made by this module
_OURS = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# without a pid: tempfile.mkstemp's (earlier versions of atomic_path) and the Rust tempfile crate's
# (safetensors' save_file). Their owner is unknown, so only old ones count as stale.
_LEGACY = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\.tmp[A-Za-z0-9]{6}$"))
LEGACY_STALE_AFTER_S = 60.0
OURS_STALE_AFTER_S = 24 * 3600.0  # even if the pid is alive (reused by another process) after a day


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same name as ``path``; on success it is renamed over ``path``.

    The temporary path lies in a private folder next to ``path`` (same file system, so the final
    ``os.replace`` is atomic). On error, the folder and anything written into it are removed.
    """
    target = Path(path)
    with _private_folder(target) as folder:
        tmp = folder / target.name
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # writers' own temporaries can be owner-only (safetensors' are)
        os.replace(tmp, target)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is renamed to ``path`` (which must not exist yet,
    or be empty). On error it is removed. For exports made of several files (a model and its tokenizer)
    that must appear all at once or not at all."""
    target = Path(path)
    with _private_folder(target) as folder:
        content = folder / target.name
        content.mkdir()
        yield content
        os.chmod(content, 0o777 & ~_umask())
        os.replace(content, target)


@contextmanager
def _private_folder(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    folder = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the temporaries that killed saves left in ``folder`` (see the module docstring); returns
    what was removed. Only names this module (or safetensors) makes are considered, so nothing else in
    the folder is touched; a save in progress in another live process is left alone."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.endswith(".tmp") and not entry.name.startswith(".tmp"):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue  # gone meanwhile
        ours = _OURS.match(entry.name)
        if ours:
            stale = not _pid_alive(int(ours["pid"])) or age > OURS_STALE_AFTER_S
        else:
            stale = any(p.match(entry.name) for p in _LEGACY) and age > LEGACY_STALE_AFTER_S
        if stale:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: trust the age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


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


def load_checkpoint_of(path: str | os.PathLike, key: str, run: Any) -> tuple[dict, Any] | None:
    """A checkpoint's tensors and metadata when it was written by ``run`` (its metadata's ``"run"``), else
    None: no file, another run's, or unreadable (a job that can be redone starts over rather than fail)."""
    if not Path(path).is_file():
        return None
    try:
        tensors, meta = load_tensors(path, key)
    except Exception:
        return None
    return (tensors, meta) if meta.get("run") == run else None
