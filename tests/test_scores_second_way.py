"""Every metric of the three scorings recomputed a second way: plain Hugging Face forward passes and
``generate`` (``model.original_model``, the transformers model under the TransformerLens bridge, same
weights), one unpadded prompt at a time, and the metrics' definitions written out again here, on a tiny model and on
the embedded one. The weights are disturbed between recording the unedited answers and scoring, so the
locality numbers are not 1.0 by construction."""

import dataclasses
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from editing.evaluate import (counterfact_cases, evaluate_accuracy, locality_pairs, locality_predictions,
                              summarize_counterfact)
from editing.generated_answers import evaluate_generated, generated_baseline
from tracing.adapter import ModelAdapter
from tracing.facts import known_facts, one_per_subject
from tracing.tokens import encode, target_token_ids


def hf_log_probs(model, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """Log-probabilities and argmax tokens at the target's positions, by one plain HF forward pass."""
    prompt_ids, target_ids = encode(model, prompt), target_token_ids(model, target)
    with torch.no_grad():
        logits = model.original_model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0].float()
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
    log_probs = [torch.log_softmax(logits[p], -1) for p in positions]
    return ([float(lp[t]) for lp, t in zip(log_probs, target_ids)], [int(lp.argmax()) for lp in log_probs],
            target_ids)


def hf_greedy(model, prompt: str, count: int) -> list[int]:
    """Greedy tokens after ``prompt`` by Hugging Face's own ``generate`` (no sampling), cut at EOS."""
    tokens, eos = torch.tensor([encode(model, prompt)]), model.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.original_model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=count,
                                            do_sample=False, pad_token_id=eos)
    new = out[0, tokens.shape[1]:].tolist()
    return new[: new.index(eos)] if eos in new else new


def normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def probability_by_hand(model, facts) -> dict:
    """ES/EM, PS/PM, NS/NM and their harmonic mean as kmeng01/memit defines them (mean per-token NLL;
    magnitudes of exp(-mean NLL); per-case means first), neighbours = the locality pairs whose answer does
    not start like the new target and whose prompt is not edited here."""
    def nll_and_p(prompt, target):
        log_probs = hf_log_probs(model, prompt, target)[0]
        return -np.mean(log_probs), np.exp(np.mean(log_probs))

    def compare(prompt, first, second):
        (nll_a, p_a), (nll_b, p_b) = nll_and_p(prompt, first), nll_and_p(prompt, second)
        return float(nll_a < nll_b), p_a - p_b

    edited = {f.prompt for f in facts}
    es, em, ps, pm, ns, nm = ([] for _ in range(6))
    for fact in facts:
        success, magnitude = compare(fact.prompt, fact.target_new, fact.target_true)
        es.append(success), em.append(magnitude)
        para = [compare(p, fact.target_new, fact.target_true) for p in fact.paraphrases]
        ps.append(np.mean([s for s, _ in para])), pm.append(np.mean([m for _, m in para]))
        new_first = target_token_ids(model, fact.target_new)[0]
        neighbours = [compare(p, a, fact.target_new) for p, a in fact.locality
                      if target_token_ids(model, a)[0] != new_first and p not in edited]
        if neighbours:
            ns.append(np.mean([s for s, _ in neighbours])), nm.append(np.mean([m for _, m in neighbours]))
    rates = [np.mean(es), np.mean(ps), np.mean(ns)]
    score = 3 / sum(1 / r for r in rates) if min(rates) > 0 else 0.0
    return {"ES": np.mean(es), "EM": np.mean(em), "PS": np.mean(ps), "PM": np.mean(pm), "NS": np.mean(ns),
            "NM": np.mean(nm), "score": score}


def token_accuracy_by_hand(model, pairs) -> float:
    """Mean over pairs of the share of target tokens that are the teacher-forced argmax."""
    per_pair = []
    for prompt, target in pairs:
        _, predicted, target_ids = hf_log_probs(model, prompt, target)
        per_pair.append(np.mean([p == t for p, t in zip(predicted, target_ids)]))
    return float(np.mean(per_pair))


def generated_hit_by_hand(model, prompt: str, answer: str) -> bool:
    tokens = hf_greedy(model, prompt, len(target_token_ids(model, answer)) + 2)
    return normalised(model.tokenizer.decode(tokens, skip_special_tokens=True)).startswith(normalised(answer))


def generated_window_by_hand(model, prompt: str, answer: str) -> str:
    n = len(target_token_ids(model, answer))
    return normalised(model.tokenizer.decode(hf_greedy(model, prompt, n + 2)[:n], skip_special_tokens=True))


@contextmanager
def disturbed(model, layer: int, scale: float):
    """A stand-in for an edit: noise on one down-projection (restored afterwards)."""
    weight = ModelAdapter.down_projection(model, layer)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * scale)
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def check_all_three_scorings(model, facts, layer: int, scale: float) -> dict:
    """Record the unedited answers, disturb the weights, then compare each scoring with its second way."""
    token_baseline = locality_predictions(model, facts, facts)
    generated_before = generated_baseline(model, facts, facts)
    unedited_tokens = {pair: hf_log_probs(model, *pair)[1] for pair in token_baseline.pairs}
    unedited_windows = [generated_window_by_hand(model, *pair) for pair in generated_before.pairs]
    with disturbed(model, layer, scale):
        probability = summarize_counterfact(counterfact_cases(model, facts)).as_dict()
        expected = probability_by_hand(model, facts)
        for key, value in expected.items():
            assert probability[key] == pytest.approx(value, abs=1e-5), key

        token = evaluate_accuracy(model, facts, token_baseline, facts)
        para = [(p, f.target_new) for f in facts for p in f.paraphrases]
        assert token.reliability == pytest.approx(token_accuracy_by_hand(model, [(f.prompt, f.target_new)
                                                                                 for f in facts]), abs=1e-9)
        assert token.generalization == pytest.approx(token_accuracy_by_hand(model, para), abs=1e-9)
        agreement = [np.mean([a == b for a, b in zip(hf_log_probs(model, *pair)[1], unedited_tokens[pair])])
                     for pair in locality_pairs(facts, facts)]
        assert token.locality == pytest.approx(np.mean(agreement), abs=1e-9)

        generated = evaluate_generated(model, facts, generated_before, facts)
        assert generated.reliability == np.mean([generated_hit_by_hand(model, f.prompt, f.target_new) for f in facts])
        assert generated.generalization == np.mean([generated_hit_by_hand(model, p, a) for p, a in para])
        now = [generated_window_by_hand(model, *pair) for pair in generated_before.pairs]
        assert generated.locality == pytest.approx(np.mean([a == b for a, b in zip(now, unedited_windows)]))
    return {"probability": probability, "token": token, "generated": generated}


def facts_partly_said(model, n: int, locality: int = 2) -> list:
    """``n`` bundled facts (``locality`` locality pairs each), the first of which asks for what the model
    itself writes after its prompt and the second for what it writes after its first paraphrase, so that
    Rel. and Gen. are neither 0 nor 1."""
    facts = [dataclasses.replace(fact, locality=fact.locality[:locality])
             for fact in one_per_subject(known_facts())[:n]]

    def said(prompt: str) -> str:
        return model.tokenizer.decode(hf_greedy(model, prompt, 2), skip_special_tokens=True)

    facts[0] = dataclasses.replace(facts[0], target_new=said(facts[0].prompt))
    facts[1] = dataclasses.replace(facts[1], target_new=said(facts[1].paraphrases[0]))
    return facts


def test_all_three_scorings_equal_plain_hugging_face_forwards_on_a_tiny_model(tiny_llama):
    scores = check_all_three_scorings(tiny_llama, facts_partly_said(tiny_llama, 4), tiny_llama.cfg.n_layers - 1,
                                      scale=0.3)
    for scoring in ("token", "generated"):  # the numbers compared are not the trivial 0 or 1
        assert 0.0 < scores[scoring].reliability < 1.0 and 0.0 < scores[scoring].locality < 1.0
    assert 0.0 < scores["token"].generalization < 1.0 and 0.0 < scores["probability"]["NS"] < 1.0


@pytest.mark.embedded
def test_all_three_scorings_equal_plain_hugging_face_forwards_on_the_embedded_model(embedded):
    scores = check_all_three_scorings(embedded, facts_partly_said(embedded, 2), embedded.cfg.n_layers - 2,
                                      scale=1.0)
    for scoring in ("token", "generated"):
        assert 0.0 < scores[scoring].reliability < 1.0 and scores[scoring].n_locality > 0
    assert 0.0 < scores["probability"]["ES"] <= 1.0
