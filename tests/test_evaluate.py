"""Evaluation conventions on tiny models: which prompts locality reads for each dataset, the zsRE loader,
the target-space convention, the unedited baseline, and batching that does not change the numbers."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from editing.evaluate import (Baseline, NoDataError, agreement, argmax_predictions, evaluate_accuracy,
                              locality_pairs, locality_predictions, markdown_table, read_continuations)
from editing.requests import EditRequestError, validate_requests
from tracing.adapter import ModelAdapter
from tracing.facts import Fact, InvalidRecordError, known_facts, load_facts
from tracing.tokens import encode, target_token_ids
from test_facts import ZSRE_RECORD  # MEND's zsRE release: alt is the new target, answers[0] the true one

COUNTERFACT = Fact("Danielle Darrieux", "The mother tongue of {} is", "French", "English",
                   paraphrases=("Danielle Darrieux spoke the language",),
                   neighborhood=("The mother tongue of Léon Blum is", "The native language of Montesquieu is"))


# --- which prompts locality reads ------------------------------------------------------------------------


def test_counterfact_records_score_locality_on_their_neighbourhood_prompts(tiny_llama):
    assert locality_pairs([COUNTERFACT]) == [("The mother tongue of Léon Blum is", "French"),
                                             ("The native language of Montesquieu is", "French")]
    baseline = locality_predictions(tiny_llama, [COUNTERFACT])
    summary = evaluate_accuracy(tiny_llama, [COUNTERFACT], baseline)
    assert summary.locality == 1.0 and summary.n_locality == 2  # used to be NaN: only `locality` was read
    assert summary.n_generalization == 1 and 0.0 <= summary.reliability <= 1.0


def test_records_with_their_own_locality_pairs_keep_them():
    """The bundled facts carry both neighbourhood prompts and locality pairs: they keep scoring the pairs
    (the lifelong benchmark's numbers do not move)."""
    fact = next(f for f in known_facts() if f.neighborhood)
    assert locality_pairs([fact]) == [pair for pair in fact.locality if pair[0] != fact.prompt]


def test_a_metric_without_data_raises_instead_of_nan(tiny_llama):
    bare = dataclasses.replace(COUNTERFACT, neighborhood=())
    with pytest.raises(NoDataError, match="locality"):
        evaluate_accuracy(tiny_llama, [bare], [])
    with pytest.raises(NoDataError, match="generalization"):
        evaluate_accuracy(tiny_llama, [dataclasses.replace(COUNTERFACT, paraphrases=())], [])
    with pytest.raises(NoDataError):
        agreement(tiny_llama, [], [])
    # data that exists but is edited elsewhere in the run: no value (None, counted 0), not NaN
    neighbour = Fact("Léon Blum", "The mother tongue of {} is", "French", "German")
    edited_all = dataclasses.replace(COUNTERFACT, neighborhood=("The mother tongue of Léon Blum is",))
    summary = evaluate_accuracy(tiny_llama, [edited_all], locality_predictions(tiny_llama, [edited_all], [neighbour]),
                                [neighbour])
    assert summary.locality is None and summary.n_locality == 0


# --- zsRE -------------------------------------------------------------------------------------------------


def test_zsre_record_edits_alt_and_scores_locality_in_the_published_format():
    fact = Fact.from_zsre(ZSRE_RECORD, case_id=3)
    assert (fact.target_new, fact.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert fact.locality == (("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),)
    assert locality_pairs([fact]) == list(fact.locality)
    assert Fact.from_zsre({**ZSRE_RECORD, "loc": ZSRE_RECORD["loc"] + "?"}).locality == fact.locality  # no second "?"


def test_zsre_records_with_nothing_to_edit_are_refused_by_name(tmp_path):
    no_alt = {**ZSRE_RECORD, "subject": "Paul Dirac", "src": "Where did Paul Dirac study?", "alt": ""}
    same = {**ZSRE_RECORD, "alt": "Illinois Institute of Technology "}  # the true answer, up to whitespace
    with pytest.raises(InvalidRecordError, match="record 0 .*Paul Dirac.*no new target"):
        Fact.from_zsre(no_alt, case_id=0)
    with pytest.raises(InvalidRecordError, match="'Watts Humphrey'.*is the true answer"):
        Fact.from_zsre(same)
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([ZSRE_RECORD, no_alt, same]))
    with pytest.raises(InvalidRecordError, match=r"2 zsRE record\(s\)(.|\n)*record 1 (.|\n)*record 2 "):
        load_facts(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = load_facts(path, skip_invalid=True)
    assert [f.case_id for f in kept] == [0] and "record 1" in str(caught[0].message)


def test_requests_whose_new_target_is_the_true_one_are_refused_naming_the_case(tiny_llama):
    fact = dataclasses.replace(Fact.from_zsre(ZSRE_RECORD, case_id=41), target_new=" Illinois Institute of Technology")
    with pytest.raises(EditRequestError, match="request 0 \\('Watts Humphrey', case 41\\).*true target"):
        validate_requests(tiny_llama, [fact])


# --- the target convention --------------------------------------------------------------------------------


def test_targets_are_read_as_one_space_then_the_text_on_multi_token_targets(tiny_llama):
    """One convention (ROME's): " " + target.strip(). A leading space in the data changes nothing, and the
    ids are those of the answer written after the prompt; the bare text or a doubled space are other
    tokens, with other probabilities."""
    tokenizer, prompt, target = tiny_llama.tokenizer, "What university did Watts Humphrey attend?", "University of Michigan"
    ids = target_token_ids(tiny_llama, target)
    assert len(ids) == 3 and ids == target_token_ids(tiny_llama, " " + target) == target_token_ids(tiny_llama, target + " ")
    assert encode(tiny_llama, prompt + " " + target) == encode(tiny_llama, prompt) + ids
    bare = tokenizer(target, add_special_tokens=False)["input_ids"]
    doubled = tokenizer("  " + target, add_special_tokens=False)["input_ids"]
    assert bare != ids and doubled != ids and bare[1:] == ids[1:]  # the first word is what differs
    spaced, unspaced = read_continuations(tiny_llama, [(prompt, target), (prompt, " " + target)])
    assert spaced.token_log_probs == unspaced.token_log_probs and spaced.target == ids
    with torch.no_grad():  # the bare-text convention scores another first token
        logits = tiny_llama(torch.tensor([encode(tiny_llama, prompt) + bare]))[0, -len(bare) - 1]
    assert abs(float(torch.log_softmax(logits.float(), -1)[bare[0]]) - spaced.token_log_probs[0]) > 1e-3


# --- the unedited baseline --------------------------------------------------------------------------------


def test_locality_is_agreement_with_the_predictions_recorded_before_the_edit(tiny_llama):
    facts = [COUNTERFACT, Fact.from_zsre(ZSRE_RECORD)]
    before = locality_predictions(tiny_llama, facts)
    assert isinstance(before, Baseline) and before.pairs == tuple(locality_pairs(facts))
    weight = ModelAdapter.down_projection(tiny_llama, tiny_llama.cfg.n_layers - 1)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():  # a stand-in for an edit that changes the locality answers
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 3)
        after = argmax_predictions(tiny_llama, before.pairs)
        expected = np.mean([np.mean([a == b for a, b in zip(x, y)]) for x, y in zip(after, before.predictions)])
        summary = evaluate_accuracy(tiny_llama, facts, before)
        assert summary.locality == pytest.approx(expected) and summary.locality < 0.9
        # a baseline taken from the edited model would have hidden the damage
        assert evaluate_accuracy(tiny_llama, facts, locality_predictions(tiny_llama, facts)).locality == 1.0
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    with pytest.raises(ValueError, match="other prompts"):
        agreement(tiny_llama, locality_pairs(facts[:1]), before)


# --- batching ---------------------------------------------------------------------------------------------


def test_numbers_do_not_depend_on_batch_size_or_padding_side(tiny_model):
    pairs = [("The Eiffel Tower is located in the city of", "Paris"), ("Hi", "University of Michigan"),
             ("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),
             ("The capital of Germany is", "Berlin")]
    tokenizer, side = tiny_model.tokenizer, tiny_model.tokenizer.padding_side
    reads = {}
    try:
        for padding_side in ("right", "left"):
            tokenizer.padding_side = padding_side
            for batch_size in (1, 3, 64):
                reads[padding_side, batch_size] = read_continuations(tiny_model, pairs, batch_size)
    finally:
        tokenizer.padding_side = side
    reference = reads["right", 1]
    for read in reads.values():
        assert [c.predicted for c in read] == [c.predicted for c in reference]
        for got, want in zip(read, reference):
            np.testing.assert_allclose(got.token_log_probs, want.token_log_probs, atol=1e-5)


# --- tables -----------------------------------------------------------------------------------------------


def test_tables_need_the_unedited_row_and_show_it_first():
    edited, unedited = {"reliability": 0.9}, {"reliability": 0.12}
    with pytest.raises(ValueError, match="unedited"):
        markdown_table({"WISE": edited}, ["reliability"])
    lines = markdown_table({"WISE": edited, "unedited": unedited}, ["reliability"]).splitlines()
    assert lines[2:] == ["| unedited | 12.0 |", "| WISE | 90.0 |"]
