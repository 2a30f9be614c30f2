"""Atomic saves: a killed save leaves at most the old file, and the next save to the folder removes the
temporaries that killed saves left behind (and nothing else)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tracing.io import atomic_dir, atomic_path, load_tensors, remove_stale_temporaries, save_tensors_atomic, write_json_atomic

KILLED_MID_SAVE = """
import sys, time
from tracing.io import atomic_path

with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as handle:
        handle.write(b"half of a new file")
        handle.flush()
        print("writing", flush=True)
        time.sleep(600)  # killed here
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_save_leaves_the_old_file_and_the_next_save_removes_its_temporary(tmp_path):
    target = tmp_path / "edit.json"
    write_json_atomic(target, {"version": "old"})
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    orphans = [p.name for p in tmp_path.iterdir() if p != target]
    assert orphans == [f".edit.json.{child.pid}.{orphans[0].split('.')[-2]}.tmp"]  # our name, the dead pid
    assert json.loads(target.read_text()) == {"version": "old"}

    write_json_atomic(tmp_path / "other.json", [1])  # any save to the folder cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "other.json"]


def test_stale_temporaries_are_recognised_by_name_owner_and_age(tmp_path):
    now = time.time()
    old, fresh = now - 3600, now - 5

    def make(name, mtime, folder=False):
        path = tmp_path / name
        path.mkdir() if folder else path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
        return name

    dead_pid = _dead_pid()
    removed = {
        make(f".edit.safetensors.{dead_pid}.0123abcd.tmp", fresh, folder=True),  # ours, owner dead
        make(".edit.safetensors.k2j_x9a1.tmp", old),  # tempfile.mkstemp's, from earlier versions
        make(".tmpAb3dE9", old),  # safetensors' own temporary, left beside the target by earlier versions
    }
    kept = {
        make(f".edit.safetensors.{os.getpid()}.0123abcd.tmp", old, folder=True),  # ours, a save in progress
        make(".edit.safetensors.k2j_x9a2.tmp", fresh),  # too young to be sure its owner is gone
        make(".tmpXy7Qz1", fresh),
        make(".hidden.tmp", old),  # not a name we make
        make(".tmp_notes", old),
        make("results.tmp", old),
    }
    assert {p.name for p in remove_stale_temporaries(tmp_path, now)} == removed
    assert {p.name for p in tmp_path.iterdir()} == kept


def test_saves_leave_only_their_target(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_tensors_atomic(tmp_path / "edit.safetensors", tensors, "factlens", {"n": 1})
    loaded, meta = load_tensors(path, "factlens")
    assert torch.equal(loaded["w"], tensors["w"]) and meta == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not owner-only like a temporary

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "edit.safetensors") as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]
    assert torch.equal(load_tensors(path, "factlens")[0]["w"], tensors["w"])


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed before the weights")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"weights")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
