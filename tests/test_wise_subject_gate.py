"""WISE's subject gate (``route_match="subject"``): only prompts that spell a subject edited into a memory
may reach it, whatever their activation score; the gate is causal, cache-exact, shapes the calibrated
floors and survives save / load."""

import dataclasses

import pytest
import torch

from editing.wise import WiseConfig, WiseEditor
from editing.wise.subject_gate import SubjectGate, memory_owners
from tracing.facts import Fact
from tracing.tokens import encode
from test_wise import EIFFEL, TINY, UNRELATED, attached, logits  # noqa: F401 (fixture)

# a threshold of 0.001 x the edit's own score and no floor: every prompt with any activation is above it,
# so what keeps a prompt out can only be the gate
OPEN = dataclasses.replace(TINY, act_ratio=0.001, calibration=0)
OTHER_SUBJECTS = ["The Colosseum is located in the city of", "The Louvre is located in the city of", *UNRELATED]
NAMING = ["The Eiffel Tower is located in the city of", "Where is the Eiffel Tower? It is in the city of"]


def test_a_position_reaches_a_memory_once_a_spelling_of_one_of_its_subjects_has_ended():
    gate = SubjectGate([[(5, 6)], [(7,), (8, 7)]], memory_owners([1, 1]), 2)
    eligible = gate.eligible([[1, 5, 6, 2], [7, 3], [5, 2, 6, 8]])
    assert eligible.shape == (2, 3, 4)
    assert eligible[0].int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]  # 5 6 spelled; 5 2 6 is not
    assert eligible[1].int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # padding keeps the last
    assert gate.reaches([[1, 5, 6, 2], [3, 7]]).tolist() == [[True, False], [False, True]]
    assert memory_owners([2, 0, 3]) == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="spellings"):
        SubjectGate([[(5,)]], [0, 0], 1)
    # 9 goes on with the word before it: a spelling followed by it ends inside a longer name
    longer = SubjectGate([[(5, 6)], [(7,), (8, 7)]], memory_owners([1, 1]), 2, continuing={9})
    assert longer.reaches([[1, 5, 6, 9], [1, 5, 6, 2], [7, 9, 7]]).tolist() == [[False, True, False],  # memory 0
                                                                               [False, False, True]]  # memory 1


def test_prompts_that_do_not_spell_an_edited_subject_never_route_whatever_their_score(tiny_llama, attached):
    clean = logits(tiny_llama, OTHER_SUBJECTS)
    ungated = attached(tiny_llama, OPEN)
    ungated.edit(EIFFEL)
    # without the gate this threshold lets every one of these prompts through ...
    assert all(r.memory == 0 for r in ungated.route(OTHER_SUBJECTS))
    ungated.detach()

    editor = attached(tiny_llama, dataclasses.replace(OPEN, route_match="subject"))
    editor.edit(EIFFEL)
    others, naming = editor.route(OTHER_SUBJECTS), editor.route(NAMING)
    # ... with it, the same scores above the same thresholds reach no memory, and the outputs do not move
    assert all(r.scores[0] > r.thresholds[0] and r.memory is None and r.eligible == [False] for r in others)
    assert all(r.margin(gated=False) > 1 and r.margin() == 0 for r in others)
    assert torch.equal(logits(tiny_llama, OTHER_SUBJECTS), clean)
    # prompts that spell the subject (at the start of the text or after a space) are routed
    assert all(r.memory == 0 and r.eligible == [True] and r.margin() > 1 for r in naming)


def test_the_gate_is_causal_and_exact_under_a_key_value_cache(tiny_llama, attached):
    from transformers import DynamicCache

    editor = attached(tiny_llama, dataclasses.replace(OPEN, route_match="subject"))
    editor.edit(EIFFEL)
    prompt = "Where is the Eiffel Tower? It is in the city of"
    ids = encode(tiny_llama, prompt)
    spelling = next(s for s in editor.spellings[0] if any(ids[i: i + len(s)] == list(s) for i in range(len(ids))))
    start = next(i for i in range(len(ids)) if ids[i: i + len(spelling)] == list(spelling))
    end = start + len(spelling)  # the subject's last token is ids[end - 1]
    editor.detach()
    clean = logits(tiny_llama, [prompt])[0]
    attached(tiny_llama, editor=editor)
    alone = logits(tiny_llama, [prompt])[0]
    # before the subject is spelled nothing changes; from its last token on the memory answers
    assert torch.equal(alone[: end - 1], clean[: end - 1])
    assert not torch.equal(alone[-1], clean[-1])
    with torch.no_grad():  # the spelling straddles two cached calls: the first ends inside the subject
        cache = DynamicCache()
        first = tiny_llama(torch.tensor([ids[: end - 1]]), past_key_values=cache)[0]
        rest = tiny_llama(torch.tensor([ids[end - 1:]]), past_key_values=cache)[0]
    torch.testing.assert_close(torch.cat([first, rest]), alone, rtol=1e-4, atol=1e-4)


def test_under_the_gate_a_floor_is_set_by_the_calibration_prompts_that_may_reach_its_memory(tiny_llama, attached):
    templates = {"P1": ["The {} is located in the city of"], "P2": ["The {} was designed by"]}
    other_relation = "The Eiffel Tower was designed by"  # the edited subject, another relation: may reach it
    calibration = [other_relation, "The Colosseum was designed by", "My favourite food is"]
    floors = {}
    for match in ("any", "subject"):
        config = dataclasses.replace(TINY, route_match=match)
        editor = attached(tiny_llama, editor=WiseEditor(config, calibration=calibration, templates=templates))
        editor.edit(EIFFEL)
        scores = [r.scores[0] for r in editor.route(calibration)]
        floors[match] = editor.memories[0].floor
        editor.detach()
    # ungated: the highest score of all three; gated: that of the one prompt that spells the edited subject
    assert floors["any"] == pytest.approx(max(scores), rel=1e-5)
    assert floors["subject"] == pytest.approx(scores[0], rel=1e-5) and 0 < floors["subject"] <= floors["any"]


def test_spellings_survive_save_and_load_and_are_rebuilt_for_files_without_them(tiny_llama, attached, tmp_path):
    from tracing.io import load_tensors, save_tensors_atomic

    editor = attached(tiny_llama, dataclasses.replace(TINY, route_match="subject", save_freq=1, merge_freq=2))
    facts = [EIFFEL, Fact("Louvre", "The {} is located in the city of", "Rome", "Paris")]
    for fact in facts:
        editor.edit(fact)
    prompts = [f.prompt for f in facts] + OTHER_SUBJECTS
    expected = logits(tiny_llama, prompts)
    path = editor.save(tmp_path / "wise.safetensors")
    editor.detach()
    loaded = attached(tiny_llama, editor=WiseEditor.load(path))
    assert loaded.spellings == editor.spellings and len(loaded.spellings) == 2
    assert torch.equal(logits(tiny_llama, prompts), expected)
    loaded.detach()
    tensors, meta = load_tensors(path, "factlens_wise")  # a file written before the gate existed
    del meta["spellings"]
    older = save_tensors_atomic(tmp_path / "older.safetensors", tensors, "factlens_wise", meta)
    rebuilt = attached(tiny_llama, editor=WiseEditor.load(older))
    assert rebuilt.spellings == editor.spellings


def test_route_match_is_checked():
    with pytest.raises(ValueError, match="route_match"):
        WiseConfig(route_match="spelling")
