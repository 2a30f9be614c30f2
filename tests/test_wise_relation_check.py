"""WISE's relation check (``relation_similarity``): behind the subject gate, a memory answers a prompt that
spells its edit's subject only from the first later position that asks the edit's relation; causal, exact
under a key-value cache, kept by save / load."""

import dataclasses

import pytest
import torch

from editing.relation_keys import later_best, running_best
from editing.wise import WiseConfig, WiseEditor
from editing.wise.subject_gate import SubjectGate, memory_owners
from tracing.tokens import encode
from test_wise import EIFFEL, attached, logits  # noqa: F401 (fixture)
from test_wise_subject_gate import OPEN

# contexts "{}" only: the relation key is the edit prompt's last state at layer 2 less the subject's direction.
# On the tiny model a later position of the paraphrase reaches 0.60 of it, "designed by" at most 0.37
CHECKED = dataclasses.replace(OPEN, route_match="subject", relation_similarity=0.5, context_prefixes=())
PARAPHRASE = "Where is the Eiffel Tower? It is in the city of"
OTHER_RELATION = "The Eiffel Tower was designed by"
PROMPTS = [EIFFEL.prompt, OTHER_RELATION, PARAPHRASE, "My favourite food is"]


def test_running_and_later_best_read_only_positions_after_the_match():
    similarity = torch.tensor([[0.9, 0.1, 0.4, 0.3, 0.8], [0.2, 0.7, 0.1, 0.6, 0.0]])
    positions = torch.tensor([1, 4])
    expected = torch.tensor([[-2, -2, 0.4, 0.4, 0.8], [-2, -2, -2, -2, -2]])
    torch.testing.assert_close(running_best(similarity, positions), expected)
    real = torch.tensor([[True, True, True, True, False], [True] * 5])
    torch.testing.assert_close(later_best(similarity, positions, real), torch.tensor([0.4, -2.0]))  # no padding


def test_the_gate_opens_a_memory_where_a_match_passes():
    gate = SubjectGate([[(5,)], [(7,)]], memory_owners([1, 1]), 2)

    def passes(rows, positions, edits):  # from two positions after the subject on
        return torch.arange(5)[None, :] >= positions[:, None] + 2

    eligible = gate.eligible([[5, 1, 1, 1, 1], [1, 7, 1, 1, 0]], passes=passes)
    assert eligible[0].int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert eligible[1].int().tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]
    assert gate.reaches([[5, 1, 1], [1, 7, 1]], passes).tolist() == [[True, False], [False, False]]


def test_the_check_keeps_a_memory_off_its_subjects_other_relations(tiny_llama, attached):
    clean = logits(tiny_llama, PROMPTS)
    unchecked = attached(tiny_llama, dataclasses.replace(CHECKED, relation_similarity=None))
    unchecked.edit(EIFFEL)  # the gate alone: every prompt spelling the subject is routed at this threshold
    assert [r.memory for r in unchecked.route(PROMPTS)] == [0, 0, 0, None]
    unchecked.detach()

    editor = attached(tiny_llama, CHECKED)
    editor.edit(EIFFEL)
    assert editor.relation.layer == 2 and editor.layer == 3  # the residual before the side layer
    assert [r.memory for r in editor.route(PROMPTS)] == [0, None, 0, None]
    after = logits(tiny_llama, PROMPTS)
    for i, n in ((1, len(encode(tiny_llama, OTHER_RELATION))), (3, len(encode(tiny_llama, PROMPTS[3])))):
        assert torch.equal(after[i, :n], clean[i, :n])  # the other relation and an unrelated prompt: untouched
    for i in (0, 2):
        n = len(encode(tiny_llama, PROMPTS[i]))
        assert (after[i, n - 1] - clean[i, n - 1]).abs().max() > 1e-3


def test_the_check_is_causal_and_exact_under_a_key_value_cache(tiny_llama, attached):
    from transformers import DynamicCache

    ids = encode(tiny_llama, PARAPHRASE)
    clean = logits(tiny_llama, [PARAPHRASE])[0]
    editor = attached(tiny_llama, CHECKED)
    editor.edit(EIFFEL)
    alone = logits(tiny_llama, [PARAPHRASE])[0]
    # the relation is asked only at the last token (0.60 there, below 0.5 before): nothing earlier moves
    assert torch.equal(alone[:-1], clean[:-1]) and not torch.equal(alone[-1], clean[-1])
    with torch.no_grad():  # the check's running best carries over from the first cached call to the second
        cache = DynamicCache()
        first = tiny_llama(torch.tensor([ids[:6]]), past_key_values=cache)[0]
        rest = tiny_llama(torch.tensor([ids[6:]]), past_key_values=cache)[0]
    torch.testing.assert_close(torch.cat([first, rest]), alone, rtol=1e-4, atol=1e-4)


def test_relation_keys_survive_save_and_load_and_are_made_for_files_without_them(tiny_llama, attached, tmp_path):
    from tracing.io import load_tensors, save_tensors_atomic

    editor = attached(tiny_llama, CHECKED)
    editor.edit(EIFFEL)
    expected = logits(tiny_llama, PROMPTS)
    path = editor.save(tmp_path / "wise.safetensors")
    editor.detach()
    loaded = attached(tiny_llama, editor=WiseEditor.load(path))
    assert torch.equal(loaded.relation.keys, editor.relation.keys)
    assert torch.equal(logits(tiny_llama, PROMPTS), expected)
    loaded.detach()
    tensors, meta = load_tensors(path, "factlens_wise")  # a file written without the check
    del tensors["relation_keys"], tensors["relation_centre"]
    older = save_tensors_atomic(tmp_path / "older.safetensors", tensors, "factlens_wise", meta)
    remade = attached(tiny_llama, editor=WiseEditor.load(older))
    torch.testing.assert_close(remade.relation.keys, editor.relation.keys)
    assert torch.equal(logits(tiny_llama, PROMPTS), expected)


def test_bad_relation_settings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="route_match='subject'"):
        WiseConfig(route_match="any", relation_similarity=0.5)
    with pytest.raises(ValueError, match="relation_similarity must be in"):
        WiseConfig(relation_similarity=1.5)
    with pytest.raises(ValueError, match="relation_layer must be in \\[0, 3\\)"):
        WiseEditor(dataclasses.replace(CHECKED, relation_layer=3)).attach(tiny_llama)
