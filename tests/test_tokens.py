import pytest

from tracing.facts import Fact, encode_fact, fact_from_prompt
from tracing.tokens import (SubjectNotFoundError, encode, encode_with_offsets, subject_token_range,
                            target_token_ids)


def _decoded(model, ids, span):
    return model.tokenizer.decode(ids[span[0]: span[1]])


def test_subject_after_a_space_is_found(tiny_llama):
    encoded = encode_with_offsets(tiny_llama, "The Eiffel Tower is located in the city of")
    span = subject_token_range(encoded, "Eiffel Tower")
    assert _decoded(tiny_llama, encoded.ids, span).strip() == "Eiffel Tower"
    assert span[0] == 1  # "The" is not part of it


def test_subject_at_start_and_glued_to_punctuation(tiny_llama):
    encoded = encode_with_offsets(tiny_llama, "Danielle Darrieux's mother tongue is")
    start, end = subject_token_range(encoded, "Danielle Darrieux")
    assert start == 0
    assert "Darrieux" in tiny_llama.tokenizer.decode(encoded.ids[start:end])
    assert "tongue" not in tiny_llama.tokenizer.decode(encoded.ids[start:end])


def test_bos_shifts_the_subject_by_one(tiny_llama):
    prompt = "The capital of Germany is"
    without = encode_with_offsets(tiny_llama, prompt)
    tiny_llama.cfg.default_prepend_bos = True
    try:
        with_bos = encode_with_offsets(tiny_llama, prompt)
    finally:
        tiny_llama.cfg.default_prepend_bos = False
    assert with_bos.ids[0] == tiny_llama.tokenizer.bos_token_id
    assert list(with_bos.ids[1:]) == list(without.ids)
    span = subject_token_range(with_bos, "Germany")
    assert span == tuple(i + 1 for i in subject_token_range(without, "Germany"))


def test_missing_subject_is_a_clear_error(tiny_llama):
    encoded = encode_with_offsets(tiny_llama, "The capital of Germany is")
    with pytest.raises(SubjectNotFoundError, match="'France' does not occur"):
        subject_token_range(encoded, "France")
    with pytest.raises(SubjectNotFoundError):
        fact_from_prompt("The capital of Germany is", "France", "Paris")


def test_template_pins_the_occurrence(tiny_llama):
    fact = Fact(subject="Paris", template="In Paris, {} is the capital", target_true="x")
    encoded, span = encode_fact(tiny_llama, fact)
    assert encoded.text == "In Paris, Paris is the capital"
    assert span[0] > 2  # the second "Paris", not the first


def test_targets_get_one_leading_space(tiny_llama):
    assert target_token_ids(tiny_llama, "Paris") == target_token_ids(tiny_llama, " Paris")
    assert tiny_llama.tokenizer.decode(target_token_ids(tiny_llama, "Paris")) == " Paris"
    with pytest.raises(ValueError):
        target_token_ids(tiny_llama, "  ")
    assert encode(tiny_llama, "Paris") != target_token_ids(tiny_llama, "Paris")
