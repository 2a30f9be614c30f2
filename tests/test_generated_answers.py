"""Generated-answer scoring and the three-scoring protocol on tiny models, each number recomputed a second
way: a plain greedy loop of unpadded forward passes (argmax of the last position, one prompt at a time)."""

import numpy as np
import pytest
import torch

from editing.evaluate import locality_pairs
from editing.generate import greedy_continuations
from editing.generated_answers import (answer_hits, evaluate_generated, generated_baseline, normalise,
                                       starts_with_answer)
from tracing.adapter import ModelAdapter
from tracing.facts import known_facts, one_per_subject
from tracing.tokens import encode, target_token_ids

PROMPTS = ["The Eiffel Tower is located in the city of", "Hi", "The capital of Germany is",
           "nq question: who played desmond doss father in hacksaw ridge?", "Danielle Darrieux spoke the language"]


def greedy_loop(model, prompt: str, count: int) -> list[int]:
    """The second way: argmax of an unpadded forward pass, token after token, stopping at EOS."""
    ids, new = encode(model, prompt), []
    for _ in range(count):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token == model.tokenizer.eos_token_id:
            break
        new.append(token)
    return new


def hit_by_hand(model, prompt: str, answer: str) -> bool:
    tokens = greedy_loop(model, prompt, len(target_token_ids(model, answer)) + 2)
    text = " ".join(model.tokenizer.decode(tokens, skip_special_tokens=True).split()).lower()
    return text.startswith(" ".join(answer.split()).lower())


def test_normalisation_ignores_case_and_whitespace_only():
    assert normalise("  Paris,\n\tFRANCE ") == "paris, france"
    assert starts_with_answer(" PARIS,  France", "paris") and starts_with_answer("New\nYork City", " new york")
    assert not starts_with_answer(" Par is", "Paris") and not starts_with_answer("Paris", " ")
    assert not starts_with_answer(" the city of Paris", "Paris")  # the continuation must start with it


def test_greedy_generation_matches_a_plain_loop_for_any_batch_size(tiny_model):
    counts = [3, 5, 1, 4, 2] * 2
    prompts = PROMPTS * 2
    by_hand = [greedy_loop(tiny_model, p, c) for p, c in zip(prompts, counts)]
    assert len({tuple(t) for t in by_hand}) > 1 and any(len(t) > 1 for t in by_hand)  # not a degenerate model
    for batch_size in (1, 3, 64):  # left padding in every batch but the first
        assert greedy_continuations(tiny_model, prompts, counts, batch_size) == by_hand
    side = tiny_model.tokenizer.padding_side
    try:
        tiny_model.tokenizer.padding_side = "right"  # the tokenizer's setting plays no part
        assert greedy_continuations(tiny_model, prompts, counts, 4) == by_hand
    finally:
        tiny_model.tokenizer.padding_side = side


def test_answer_hits_recomputed_by_hand(tiny_llama):
    decode = tiny_llama.tokenizer.decode
    own = [decode(greedy_loop(tiny_llama, p, 2)) for p in PROMPTS]  # what the model says: hits
    pairs = [(p, answer) for p, answer in zip(PROMPTS, own)]
    pairs += [(p, answer.upper() + "  ") for p, answer in zip(PROMPTS, own)]  # case and spaces do not count
    pairs += [(p, "University of Michigan") for p in PROMPTS]  # what it does not say: misses
    hits = answer_hits(tiny_llama, pairs, batch_size=4)
    assert hits == [hit_by_hand(tiny_llama, p, a) for p, a in pairs]
    assert hits[:10] == [True] * 10 and not any(hits[10:])
    assert answer_hits(tiny_llama, pairs, batch_size=1) == hits == answer_hits(tiny_llama, pairs, batch_size=64)


@pytest.fixture(scope="module")
def facts():
    return one_per_subject(known_facts())[:4]


def test_generated_scores_recomputed_by_hand_and_locality_against_the_unedited_model(tiny_llama, facts):
    baseline = generated_baseline(tiny_llama, facts, facts)
    unedited = evaluate_generated(tiny_llama, facts, baseline, facts)
    assert unedited.locality == 1.0 and unedited.n_locality == len(locality_pairs(facts, facts)) > 0
    assert unedited.reliability == np.mean([hit_by_hand(tiny_llama, f.prompt, f.target_new) for f in facts])
    para = [(p, f.target_new) for f in facts for p in f.paraphrases]
    assert unedited.n_generalization == len(para)
    assert unedited.generalization == np.mean([hit_by_hand(tiny_llama, p, a) for p, a in para])

    def window(prompt, answer):  # the answer's length of generated tokens, normalised
        n = len(target_token_ids(tiny_llama, answer))
        text = tiny_llama.tokenizer.decode(greedy_loop(tiny_llama, prompt, n + 2)[:n], skip_special_tokens=True)
        return " ".join(text.split()).lower()

    before = [window(p, a) for p, a in baseline.pairs]
    weight = ModelAdapter.down_projection(tiny_llama, tiny_llama.cfg.n_layers - 1)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():  # a stand-in for an edit that changes what the model says elsewhere
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 3)
        damaged = evaluate_generated(tiny_llama, facts, baseline, facts)
        expected = np.mean([window(p, a) == b for (p, a), b in zip(baseline.pairs, before)])
        assert damaged.locality == pytest.approx(expected) and damaged.locality < 1.0
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    with pytest.raises(ValueError, match="other prompts"):
        evaluate_generated(tiny_llama, facts[:2], baseline, facts)  # recorded on all four facts' prompts


def test_per_call_reads_merge_to_one_read_of_all_facts(tiny_llama, facts):
    """after_each merges its calls' reads: on one model state that must equal one read of every fact."""
    from editing.protocol import score_now
    from editing.scoring import SCORINGS, scoring

    scorings = [scoring(name) for name in SCORINGS]
    whole = score_now(tiny_llama, facts, scorings)
    for s in scorings:
        parts = [s.read(tiny_llama, call, s.record(tiny_llama, call, facts), facts) for call in (facts[:1], facts[1:])]
        merged = s.merge(parts)
        assert merged.keys() == whole[s.name].keys() and merged["scoring"] == s.name
        for key, value in whole[s.name].items():
            assert merged[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), (s.name, key)


def test_generated_and_token_summaries_share_one_shape_and_never_merge_into_one_number():
    """Both token and generated reads summarise into AccuracySummary, labelled by scoring; merging a token
    read with a generated one would average two different hit definitions, so it is refused."""
    from editing.evaluate import AccuracySummary, merge_accuracy
    from editing.generated_answers import GeneratedHits

    generated = GeneratedHits((True, False), (True,), (False, False, True)).summary()
    assert isinstance(generated, AccuracySummary)
    assert generated.as_dict() == {"scoring": "generated", "n_cases": 2, "reliability": 0.5, "generalization": 1.0,
                                   "locality": pytest.approx(1 / 3), "n_generalization": 1, "n_locality": 3}
    token = AccuracySummary(1, 1.0, None, 0.0, 0, 1)
    doubled = {**generated.as_dict(), "n_cases": 4, "n_generalization": 2, "n_locality": 6}
    assert merge_accuracy([generated, generated]).as_dict() == doubled
    with pytest.raises(ValueError, match="different scorings"):
        merge_accuracy([generated, token])


def test_protocols_edit_then_score_and_one_call_after_each_is_after_all(tiny_llama, facts):
    from conftest import weights_digest
    from editing.editor import create_editor
    from editing.grace import GraceConfig
    from editing.protocol import edit_and_score, score_now
    from editing.scoring import SCORINGS, scoring

    scorings = [scoring(name) for name in SCORINGS]
    unedited = score_now(tiny_llama, facts, scorings)
    weights = weights_digest(tiny_llama)
    results = {}
    for protocol, batch in (("after_all", 2), ("after_each", 2), ("after_each", 4), ("after_all", 4)):
        editor = create_editor("grace", tiny_llama, GraceConfig(n_iter=30, edit_lr=0.5))
        try:
            results[protocol, batch] = edit_and_score(tiny_llama, editor, facts, batch, protocol, scorings)
        finally:
            editor.undo()
    assert weights_digest(tiny_llama) == weights
    assert results["after_each", 2].calls == 2 and results["after_all", 4].calls == 1
    assert results["after_each", 4].scores == results["after_all", 4].scores
    for result in results.values():  # the codebook answers its own prompts, teacher-forced and generated
        assert result.scores["token"]["reliability"] > unedited["token"]["reliability"] + 0.5
        assert result.scores["generated"]["reliability"] >= unedited["generated"]["reliability"]
        assert result.scores["probability"]["ES"] == 1.0 and result.seconds_editing > 0


def test_after_all_reads_the_unedited_record_it_is_given_and_records_nothing_again(tiny_llama, facts):
    import dataclasses

    from editing.editor import create_editor
    from editing.grace import GraceConfig
    from editing.protocol import edit_and_score, record_unedited, score_now
    from editing.scoring import scoring

    calls = []
    plain = scoring("token")

    def counted(model, group, edited):
        calls.append(len(group))
        return plain.record(model, group, edited)

    scorings = [dataclasses.replace(plain, record=counted)]
    recorded = record_unedited(tiny_llama, facts, scorings)
    unedited = score_now(tiny_llama, facts, scorings, recorded)
    assert calls == [len(facts)] and unedited["token"]["locality"] == 1.0
    results = {}
    for given in (recorded, None):
        editor = create_editor("grace", tiny_llama, GraceConfig(n_iter=30, edit_lr=0.5))
        try:
            results[given is None] = edit_and_score(tiny_llama, editor, facts, 2, "after_all", scorings,
                                                    recorded=given).scores
        finally:
            editor.undo()
    assert calls == [len(facts), len(facts)]  # only the run without ``recorded`` recorded again
    assert results[True] == results[False]
    assert results[False]["token"]["reliability"] > unedited["token"]["reliability"]


@pytest.mark.embedded
def test_the_embedded_model_says_the_facts_it_knows_and_the_hits_are_recomputed_by_hand(embedded):
    """Known facts (chosen because SmolLM2 ranks their answer first): generated from the prompt alone, most
    start with the true answer and none with the counterfactual one; the same hits by a plain greedy loop."""
    facts = one_per_subject(known_facts())[::150][:4]
    true = [(f.prompt, f.target_true) for f in facts]
    new = [(f.prompt, f.target_new) for f in facts]
    hits = answer_hits(embedded, true + new, batch_size=5)
    assert hits == [hit_by_hand(embedded, p, a) for p, a in true + new]
    assert sum(hits[:4]) >= 3 and not any(hits[4:])
