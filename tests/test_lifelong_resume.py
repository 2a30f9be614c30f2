"""A lifelong stream killed part-way goes on from its last checkpoint and ends with the rows an
uninterrupted stream gives (benchmarks/lifelong.py --resume)."""

import dataclasses
import sys
from pathlib import Path

import pytest

from conftest import weights_digest
from test_editors import CONFIGS

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from lifelong import run_stream  # noqa: E402

import editing.editor  # noqa: E402
from tracing.facts import known_facts, one_per_subject  # noqa: E402

FAST = {
    "grace": CONFIGS["grace"],
    "wise-easyedit": dataclasses.replace(CONFIGS["wise-easyedit"], n_iter=8, save_freq=2),
    "alphaedit": CONFIGS["alphaedit"],
}
SCORES = ("reliability", "generalization", "locality", "unrelated", "routed", "routed_and_answered")


class Killed(Exception):
    """Stands in for a kill: raised inside an edit call."""


def killing_after(calls: int, monkeypatch) -> None:
    """Make the next editor created raise :class:`Killed` at its call number ``calls + 1``."""
    create = editing.editor.create_editor

    def create_then_wrap(name, model, config=None):
        editor = create(name, model, config)
        edit, done = editor.edit, []

        def edit_or_die(facts, *args, **kwargs):
            if len(done) == calls:
                raise Killed
            done.append(facts)
            return edit(facts, *args, **kwargs)

        editor.edit = edit_or_die
        return editor

    monkeypatch.setattr(editing.editor, "create_editor", create_then_wrap)


@pytest.mark.parametrize("name", sorted(FAST))
def test_a_killed_stream_resumes_and_scores_as_an_uninterrupted_one(tiny_llama, tmp_path, monkeypatch, name):
    pool = one_per_subject(known_facts())
    facts, held_out = pool[:6], pool[20:22]
    weights = weights_digest(tiny_llama)
    whole = run_stream(tiny_llama, name, FAST[name], facts, 2, "after_all", held_out, [2, 6])

    folder, seen = tmp_path / "stream", []
    with monkeypatch.context() as patch:
        killing_after(2, patch)  # the second call's save is the last one
        with pytest.raises(Killed):
            run_stream(tiny_llama, name, FAST[name], facts, 2, "after_all", held_out, [2, 6], seen.append, folder, 1)
    assert weights_digest(tiny_llama) == weights  # the killed stream undid its edits
    assert [row["T"] for row in seen] == [2] and (folder / "progress.json").exists()
    assert sorted(p.name for p in folder.glob("editor-*")) == ["editor-4.safetensors"]  # older saves dropped

    resumed = run_stream(tiny_llama, name, FAST[name], facts, 2, "after_all", held_out, [2, 6], seen.append, folder, 1)
    assert [row["T"] for row in resumed] == [6] and resumed[0]["resumed_at"] == 4
    for key in SCORES:
        assert resumed[0][key] == pytest.approx(whole[1][key], abs=1e-9), key
        assert seen[0][key] == pytest.approx(whole[0][key], abs=1e-9), key
    assert not (folder / "progress.json").exists() and not list(folder.glob("editor-*"))  # cleared when done
    assert weights_digest(tiny_llama) == weights


def test_a_checkpoint_of_another_stream_is_refused_before_any_edit(tiny_llama, tmp_path, monkeypatch):
    pool = one_per_subject(known_facts())
    facts, held_out = pool[:4], pool[20:21]
    folder = tmp_path / "stream"
    with monkeypatch.context() as patch:
        killing_after(1, patch)
        with pytest.raises(Killed):
            run_stream(tiny_llama, "grace", FAST["grace"], facts, 2, "after_all", held_out, None, resume=folder,
                       save_every=1)
    weights = weights_digest(tiny_llama)
    other = dataclasses.replace(FAST["grace"], n_iter=7)
    with pytest.raises(ValueError, match="checkpoint of another stream"):
        run_stream(tiny_llama, "grace", other, facts, 2, "after_all", held_out, None, resume=folder)
    with pytest.raises(ValueError, match="checkpoint of another stream"):
        run_stream(tiny_llama, "grace", FAST["grace"], pool[4:8], 2, "after_all", held_out, None, resume=folder)
    with pytest.raises(ValueError, match="after_all"):
        run_stream(tiny_llama, "grace", FAST["grace"], facts, 2, "after_each", held_out, None, resume=folder)
    assert weights_digest(tiny_llama) == weights and (folder / "progress.json").exists()
