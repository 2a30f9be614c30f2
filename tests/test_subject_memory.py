"""The subject memory's gate: an entry answers where a spelling of its subject ends (and its key matches),
never on another subject that merely shares a token; the state gate alone cannot tell those apart."""

import dataclasses

import pytest
import torch

from editing.generate import _left_padded_batches
from editing.subject_memory import SubjectMemoryConfig, SubjectMemoryEditor
from editing.subject_spellings import SpellingIndex, subject_spellings, word_continuations
from tracing.causal_trace import TraceConfig, choose_engine
from tracing.facts import Fact
from tracing.tokens import encode

SAN_DIEGO = Fact("San Diego", "{} is a city in the state of", "California", "Texas")
ON_SUBJECT = "The mayor of San Diego lives in the state of"
SHARED_TOKEN = "The mother tongue of Diego Maradona is"  # " Diego" ends San Diego's spelling too
ELSEWHERE = "The weather today is"


def test_spellings_are_found_where_they_end_and_only_whole():
    index = SpellingIndex([[(5, 6)], [(6,)], [(5, 6), (7, 5, 6)]])
    rows, positions, entries = index.matches([[1, 5, 6, 2], [6, 6], [7, 5, 6]])
    found = sorted(zip(rows, positions, entries))
    assert found == [(0, 2, 0), (0, 2, 1), (0, 2, 2), (1, 0, 1), (1, 1, 1),
                     (2, 2, 0), (2, 2, 1), (2, 2, 2)]  # (2, 2, 2) once, though two of its spellings end there
    assert index.matches([[6, 5], []]) == ([0], [0], [1])


def test_a_spelling_followed_by_a_token_that_goes_on_with_the_word_is_no_match():
    index = SpellingIndex([[(5, 6)], [(6,)]], continuing={9})
    rows, positions, entries = index.matches([[5, 6, 9, 2], [5, 6, 2], [6, 9], [6]])
    assert sorted(zip(rows, positions, entries)) == [(1, 1, 0), (1, 1, 1), (3, 0, 1)]  # 9 after: no match


GUINEA = Fact("Guinea", "In {}, the official language is", "French", "Uzbek")


def test_word_continuations_are_the_tokens_inside_a_word(tiny_llama):
    continuing = word_continuations(tiny_llama.tokenizer)
    assert word_continuations(tiny_llama.tokenizer) is continuing  # read once per tokenizer
    tokenizer = tiny_llama.tokenizer

    def after(text: str, name: str) -> int:
        """The id of the token that follows ``name``'s tokens in ``text``."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[len(tokenizer(name, add_special_tokens=False)["input_ids"])]

    assert after("Guinea-Bissau is", "Guinea") in continuing
    for text in ("Guinea, the", "Guinea is", "Guinea's capital", "Guinea."):
        assert after(text, "Guinea") not in continuing, text


def test_the_subject_gate_keeps_off_a_longer_name_that_starts_with_the_subject(tiny_llama):
    """"Guinea" ends inside "Guinea-Bissau": the token after it goes on with the name, so the entry
    stays silent there, and answers where the name ends ("Guinea,")."""
    own, longer = GUINEA.prompt, "In Guinea-Bissau, the official language is"
    before = {p: _last_logits(tiny_llama, p) for p in (own, longer)}
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 relation_similarity=None, answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(GUINEA)
        assert (_last_logits(tiny_llama, own) - before[own]).abs().max() > 1e-3
        assert torch.equal(_last_logits(tiny_llama, longer), before[longer])
    finally:
        editor.undo()


def test_a_subject_is_spelled_as_in_its_prompt_alone_and_after_a_space(tiny_llama):
    spellings = subject_spellings(tiny_llama, SAN_DIEGO, ["Some text. {}"])
    tokenizer = tiny_llama.tokenizer
    assert {tokenizer.decode(s).strip() for s in spellings} == {"San Diego"}
    assert tuple(tokenizer("San Diego", add_special_tokens=False)["input_ids"]) in spellings
    assert tuple(tokenizer(" San Diego", add_special_tokens=False)["input_ids"]) in spellings
    assert len(spellings) == len(set(spellings))


def _last_logits(model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([encode(model, prompt)]))[0, -1]


def test_the_subject_gate_answers_on_the_subject_and_not_on_a_shared_token(tiny_llama):
    last_token = tiny_llama.tokenizer(" San Diego", add_special_tokens=False)["input_ids"][-1]
    assert last_token in encode(tiny_llama, SHARED_TOKEN)  # the shared token is really there
    before = {p: _last_logits(tiny_llama, p) for p in (ON_SUBJECT, SHARED_TOKEN, ELSEWHERE)}
    # similarity -1 and no relation check: every key matches every state, so only the spelling decides
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 relation_similarity=None, answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        assert choose_engine(tiny_llama, TraceConfig())[0] == "reference"  # the gate reads earlier tokens
        after = {p: _last_logits(tiny_llama, p) for p in before}
        assert (after[ON_SUBJECT] - before[ON_SUBJECT]).abs().max() > 1e-3
        assert torch.equal(after[SHARED_TOKEN], before[SHARED_TOKEN])
        assert torch.equal(after[ELSEWHERE], before[ELSEWHERE])
        assert editor.route([ON_SUBJECT, SHARED_TOKEN])[0].memory == 0
        assert editor.route([ON_SUBJECT, SHARED_TOKEN])[1].memory is None
    finally:
        editor.undo()
    assert choose_engine(tiny_llama, TraceConfig())[0] == "fast"
    assert torch.equal(_last_logits(tiny_llama, ON_SUBJECT), before[ON_SUBJECT])


def test_the_state_gate_alone_answers_wherever_a_key_matches(tiny_llama):
    before = _last_logits(tiny_llama, SHARED_TOKEN)
    config = SubjectMemoryConfig(layer=2, calibration=0, context_prefixes=(), match="state", similarity=-1.0,
                                 answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        assert choose_engine(tiny_llama, TraceConfig())[0] == "fast"  # position by position: suffixes stay exact
        assert (_last_logits(tiny_llama, SHARED_TOKEN) - before).abs().max() > 1e-3
    finally:
        editor.undo()


def test_saved_spellings_come_back(tiny_llama, tmp_path):
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        path = editor.save(tmp_path / "memory.safetensors")
        expected = _last_logits(tiny_llama, ON_SUBJECT)
    finally:
        editor.undo()
    loaded = SubjectMemoryEditor.load(path, tiny_llama)
    try:
        assert loaded.spellings == editor.spellings
        assert torch.equal(_last_logits(tiny_llama, ON_SUBJECT), expected)
        assert torch.equal(_last_logits(tiny_llama, SHARED_TOKEN), _last_logits_unedited(tiny_llama, loaded))
    finally:
        loaded.undo()


def _last_logits_unedited(model, editor) -> torch.Tensor:
    editor.detach()
    try:
        return _last_logits(model, SHARED_TOKEN)
    finally:
        editor.attach(model)


OTHER_RELATION = "San Diego was named after the saint"


@pytest.mark.parametrize("relation_layer", [2, 3])
def test_the_relation_check_keeps_an_edit_off_its_subjects_other_relations(tiny_llama, tmp_path, relation_layer):
    """With ``relation_similarity`` an entry answers its own question about the subject, not another one;
    right padding after a prompt does not count as a later position; the check survives save and load.
    ``relation_layer`` 3 (the default on this 4-layer model): the hook at layer 2 runs the model on to layer 3
    to read the relation."""
    from tracing.tokens import right_padded

    prompts = (SAN_DIEGO.prompt, OTHER_RELATION)
    before = {p: _last_logits(tiny_llama, p) for p in prompts}
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 relation_similarity=0.8, relation_layer=relation_layer,
                                 answer_logprob=None)  # contexts "{}" only:
    # the key is the prompt's last state less its subject direction (0.92 / 0.97 similar to the prompt's last
    # state at layer 2 / 3, 0.32 / 0.29 at most for the other relation)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        assert editor.relation_layer == relation_layer
        after = {p: _last_logits(tiny_llama, p) for p in prompts}
        assert (after[SAN_DIEGO.prompt] - before[SAN_DIEGO.prompt]).abs().max() > 1e-3
        assert torch.equal(after[OTHER_RELATION], before[OTHER_RELATION])
        assert [r.memory for r in editor.route(list(prompts))] == [0, None]
        rows = [encode(tiny_llama, p) for p in (*prompts, ELSEWHERE + " and the rest of a longer text")]
        with torch.no_grad():
            batched = tiny_llama(right_padded(tiny_llama, rows))
        for i, prompt in enumerate(prompts):
            assert torch.allclose(batched[i, len(rows[i]) - 1], after[prompt], atol=1e-4)
        path = editor.save(tmp_path / "memory.safetensors")
    finally:
        editor.undo()
    without = SubjectMemoryEditor(SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                                      relation_similarity=None, answer_logprob=None)).attach(tiny_llama)
    try:
        without.edit(SAN_DIEGO)  # no relation check: the δ reaches the other relation too
        assert (_last_logits(tiny_llama, OTHER_RELATION) - before[OTHER_RELATION]).abs().max() > 1e-3
    finally:
        without.undo()
    loaded = SubjectMemoryEditor.load(path, tiny_llama)
    try:
        assert torch.equal(_last_logits(tiny_llama, OTHER_RELATION), before[OTHER_RELATION])
        assert torch.allclose(_last_logits(tiny_llama, SAN_DIEGO.prompt), after[SAN_DIEGO.prompt])
    finally:
        loaded.undo()


def test_a_relation_layer_before_the_memory_is_refused_and_another_one_remakes_the_keys(tiny_llama, tmp_path):
    """The relation is read at the memory's layer or later; a memory saved with relation keys of one layer,
    attached under a config naming another, makes them again there (the entries stay as they were)."""
    with pytest.raises(ValueError, match="relation_layer must be in \\[2, 4\\)"):
        SubjectMemoryEditor(SubjectMemoryConfig(layer=2, relation_layer=1, answer_logprob=None)).attach(tiny_llama)
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), relation_layer=2,
                                 answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        path = editor.save(tmp_path / "memory.safetensors")
    finally:
        editor.undo()
    direct = SubjectMemoryEditor(dataclasses.replace(config, relation_layer=3)).attach(tiny_llama)
    try:
        direct.edit(SAN_DIEGO)
    finally:
        direct.undo()
    loaded = SubjectMemoryEditor.load(path)
    assert loaded.relation_layer == 2
    loaded.config = dataclasses.replace(loaded.config, relation_layer=3)
    loaded.attach(tiny_llama)
    try:
        assert loaded.relation_layer == 3
        assert torch.allclose(loaded.relation_keys, direct.relation_keys, atol=1e-5)
        assert not torch.allclose(loaded.relation_keys, editor.relation_keys, atol=1e-2)
        assert torch.equal(loaded.deltas, editor.deltas)
    finally:
        loaded.undo()


def test_a_memory_saved_under_another_default_relation_layer_loads_with_the_layer_it_was_saved_with(
        tiny_llama, tmp_path, monkeypatch):
    """A config that left ``relation_layer`` to the default depth is saved with the layer that depth gave;
    when the default moves (0.8 -> 0.9 of the depth, 2026-12-04), the loaded memory still reads there."""
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 relation_similarity=0.0, answer_logprob=None)
    monkeypatch.setattr("editing.subject_memory.RELATION_DEPTH", 0.5)  # layer 2 of 4
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        assert editor.relation_layer == 2
        path = editor.save(tmp_path / "memory.safetensors")
        expected = _last_logits(tiny_llama, ON_SUBJECT)
    finally:
        editor.undo()
    monkeypatch.undo()
    assert config.resolved_relation_layer(tiny_llama) == 3
    loaded = SubjectMemoryEditor.load(path, tiny_llama)
    try:
        assert loaded.relation_layer == 2 and torch.equal(loaded.relation_keys, editor.relation_keys)
        assert torch.equal(_last_logits(tiny_llama, ON_SUBJECT), expected)
    finally:
        loaded.undo()


LONG_ELSEWHERE = ELSEWHERE + " " + " ".join(["and then the weather changed"] * 8)  # pads the others


def _assert_left_padded_reads_as_alone(model, prompts: list[str]) -> None:
    """Each row's last logits in a left-padded batch with an attention mask (as generation pads) equal
    those of the row run by itself."""
    alone = torch.stack([_last_logits(model, p) for p in prompts])
    rows, ids, mask = next(_left_padded_batches(model, prompts, len(prompts)))
    assert len({len(r) for r in rows}) > 1  # the batch is padded
    with torch.no_grad():
        padded = model.original_model(input_ids=ids, attention_mask=mask,
                                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert torch.allclose(padded, alone, atol=1e-4)


def test_the_relation_check_reads_a_left_padded_row_as_it_reads_it_alone(tiny_llama):
    """Generation pads on the left and passes an attention mask; the check's nested forward to the relation
    layer sees token ids only, so it must run each row's real tokens alone. Each row's last logits in a
    left-padded batch equal those of the row run by itself, edited prompt and other relation alike."""
    prompts = [SAN_DIEGO.prompt, OTHER_RELATION, LONG_ELSEWHERE]
    config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                 relation_similarity=0.8, relation_layer=3, answer_logprob=None)
    editor = SubjectMemoryEditor(config).attach(tiny_llama)
    try:
        editor.edit(SAN_DIEGO)
        _assert_left_padded_reads_as_alone(tiny_llama, prompts)
        assert [r.memory for r in editor.route(prompts)] == [0, None, None]
    finally:
        editor.undo()


def _old_answer_best(model, prompt: str, subject: str, answer: str) -> float:
    """The unedited model's best log-probability of ``answer``'s first token as the next token at a position
    after the subject's last token of ``prompt`` (what ``answer_logprob`` is compared with)."""
    from tracing.tokens import target_token_ids

    ids = encode(model, prompt)
    end = len(encode(model, prompt[: prompt.index(subject) + len(subject)])) - 1
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return float(log_probs[end + 1:, target_token_ids(model, answer)[0]].max())


def test_the_old_answer_check_lets_an_entry_answer_only_where_the_unedited_model_gives_its_old_answer(tiny_llama):
    """``answer_logprob``: an entry answers only where, at some position after its subject, the unedited model
    gives the edit's old answer at least that log-probability. Just below the edit prompt's own best value it
    answers there; just above, the prompt keeps its unedited logits; a left-padded batch reads each row as
    it reads it alone."""
    best = _old_answer_best(tiny_llama, SAN_DIEGO.prompt, SAN_DIEGO.subject, SAN_DIEGO.target_true)
    before = _last_logits(tiny_llama, SAN_DIEGO.prompt)
    answered = {}
    for offset in (-0.01, 0.01):
        config = SubjectMemoryConfig(layer=2, calibration=16, context_prefixes=(), subject_similarity=-1.0,
                                     relation_similarity=None, relation_layer=3, answer_logprob=best + offset)
        editor = SubjectMemoryEditor(config).attach(tiny_llama)
        try:
            editor.edit(SAN_DIEGO)
            after = _last_logits(tiny_llama, SAN_DIEGO.prompt)
            answered[offset] = bool((after - before).abs().max() > 1e-3)
            if offset < 0:
                _assert_left_padded_reads_as_alone(tiny_llama, [SAN_DIEGO.prompt, LONG_ELSEWHERE])
            else:
                assert torch.equal(after, before)
                assert editor.route([SAN_DIEGO.prompt])[0].memory is None
        finally:
            editor.undo()
    assert answered == {-0.01: True, 0.01: False}
