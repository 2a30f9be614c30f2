"""Portability (MQuAKE multi-hop questions, KnowEdit portability prompts) on the tiny model: each score
recomputed a second way (plain unpadded forward passes), the per-case "any question" logic, whole cases per
call, and ``python -m editing.evaluate`` on small MQuAKE / KnowEdit / CounterFact fixture files."""

import json

import numpy as np
import pytest
import torch

import tracing.models as models
from editing.evaluation_command import main
from editing.portability import (PortabilityCase, PortabilityReads, cases_in, generated_portability,
                                 knowedit_cases, multi_hop_cases, token_portability, with_portability)
from editing.protocol import batches
from tracing.datasets import load_dataset, mquake_cases
from tracing.facts import Fact
from tracing.tokens import encode, target_token_ids
from test_generated_answers import greedy_loop

QUESTIONS = ("The capital of the country whose citizen Vince McMahon is, is", "Which city hosts that government?",
             "Name the seat of that state's government:")


def rewrite(subject: str, prompt: str, true: str, new: str) -> dict:
    return {"prompt": prompt, "subject": subject, "relation_id": "P0",
            "target_true": {"str": true}, "target_new": {"str": new}}


def mquake_records() -> list[dict]:
    """Three MQuAKE-shaped cases: two rewrites, then one, then one. Case 1's first question is its rewrite
    prompt itself, so an edit that answers the prompt must answer that question."""
    return [
        {"case_id": 11, "requested_rewrite": [rewrite("Vince McMahon", "{} is a citizen of", "United States", "Libya"),
                                              rewrite("Libya", "The capital of {} is", "Tripoli", "Franklin")],
         "questions": list(QUESTIONS), "answer": "Washington", "answer_alias": ["Washington, D.C."],
         "new_answer": "Franklin", "new_answer_alias": ["Franklin, Kentucky"]},
        {"case_id": 12, "requested_rewrite": [rewrite("Danielle Darrieux", "The mother tongue of {} is", "French",
                                                      "Dutch")],
         "questions": ["The mother tongue of Danielle Darrieux is", "Which language did Darrieux first speak?",
                       "Darrieux grew up speaking"],
         "answer": "French", "new_answer": "Dutch", "new_answer_alias": ["Flemish"]},
        {"case_id": 13, "requested_rewrite": [rewrite("Toko Yasuda", "{} plays the", "guitar", "piano")],
         "questions": ["Toko Yasuda plays the", "Which instrument is Yasuda known for?",
                       "On stage, Toko Yasuda performs on the"],
         "answer": "guitar", "new_answer": "piano"},
    ]


def write(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def token_accuracy_by_hand(model, prompt: str, answer: str) -> float:
    """The second way for teacher forcing: one unpadded forward pass, argmax at the answer's positions."""
    ids, target = encode(model, prompt), target_token_ids(model, answer)
    with torch.no_grad():
        logits = model(torch.tensor([ids + target]))[0]
    predicted = logits[len(ids) - 1: len(ids) - 1 + len(target)].argmax(-1).tolist()
    return float(np.mean([p == t for p, t in zip(predicted, target)]))


def generated_hit_by_hand(model, prompt: str, answers) -> float:
    """The second way for generation: a plain greedy loop as long as the longest answer needs."""
    count = max(len(target_token_ids(model, a)) for a in answers) + 2
    text = " ".join(model.tokenizer.decode(greedy_loop(model, prompt, count), skip_special_tokens=True).split()).lower()
    return float(any(text.startswith(" ".join(a.split()).lower()) for a in answers))


# --- the scores, a second way ------------------------------------------------------------------------------


def test_portability_scores_equal_plain_forward_passes(tiny_llama, tmp_path):
    cases = multi_hop_cases(mquake_cases(write(tmp_path / "mquake.json", mquake_records())))
    assert [len(case.facts) for case in cases] == [2, 1, 1]
    assert cases[0].answers == (("Franklin", "Franklin, Kentucky"),) * 3 and cases[2].answers == (("piano",),) * 3
    token, generated = token_portability(tiny_llama, cases), generated_portability(tiny_llama, cases, batch_size=2)
    assert [len(scores) for scores in token.scores] == [3, 3, 3] == [len(scores) for scores in generated.scores]
    for case, token_scores, hits in zip(cases, token.scores, generated.scores):
        for question, answers, score, hit in zip(case.questions, case.answers, token_scores, hits):
            assert score == pytest.approx(max(token_accuracy_by_hand(tiny_llama, question, a) for a in answers))
            assert hit == generated_hit_by_hand(tiny_llama, question, answers)
    summary = token.summary()
    questions = [s for scores in token.scores for s in scores]
    assert summary["portability"] == pytest.approx(np.mean(questions))
    assert summary["portability_case"] == pytest.approx(np.mean([max(s) for s in token.scores]))
    assert (summary["n_portability_questions"], summary["n_portability_cases"]) == (9, 3)


def test_a_case_counts_when_any_one_of_its_questions_is_answered(tiny_llama):
    """The answer is what the model itself says to the first question: one hit of three, and the case counts."""
    first = greedy_loop(tiny_llama, QUESTIONS[0], 2)
    said = tiny_llama.tokenizer.decode(first, skip_special_tokens=True).strip()
    assert said  # the tiny model writes some text here
    fact = Fact("Libya", "The capital of {} is", "Tripoli", "Franklin")
    one = PortabilityCase(1, (fact,), QUESTIONS, ((said,),) * 3)
    none = PortabilityCase(2, (fact,), QUESTIONS[1:], (("zzzz qqqq",),) * 2)
    reads = generated_portability(tiny_llama, [one, none])
    assert reads.scores == ((1.0, 0.0, 0.0), (0.0, 0.0))
    summary = reads.summary()
    assert summary["portability"] == pytest.approx(1 / 5) and summary["portability_case"] == 0.5
    assert summary["portability_case"] > summary["portability"]
    assert PortabilityReads(((1.0, 0.0, 0.0),)).summary()["portability_case"] == 1.0
    assert PortabilityReads(()).summary()["portability"] is None  # no case: no number (and no column)


def test_knowedit_portability_prompts_are_cases_with_their_own_answers(tmp_path):
    record = {"subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
              "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
              "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                     "ground_truth": ["genus"]}]},
              "portability": {"Reasoning": [{"prompt": "The common name of the family Epaspidoceras belongs to is",
                                             "ground_truth": "Owlet moths"}],
                              "Logical_Generalization": [{"prompt": "Epaspidoceras is a kind of", "ground_truth": "moth"}]}}
    plain = {**record, "subject": "Watts", "prompt": "Where did Watts study?", "portability": {}}
    facts = load_dataset(write(tmp_path / "knowedit.json", [record, plain]))
    [case] = knowedit_cases(facts)
    assert case.facts == (facts[0],) and case.answers == (("Owlet moths",), ("moth",))
    assert case.questions == ("The common name of the family Epaspidoceras belongs to is", "Epaspidoceras is a kind of")


def test_calls_keep_cases_whole_and_a_split_case_is_refused(tmp_path):
    cases = mquake_cases(write(tmp_path / "mquake.json", mquake_records()))
    facts = [fact for case in cases for fact in case.edits]
    owner = {id(fact): i for i, case in enumerate(cases) for fact in case.edits}
    calls = batches(facts, 1, lambda fact: owner[id(fact)])
    assert [len(call) for call in calls] == [2, 1, 1]  # a batch of one case is both rewrites of case 11
    assert [len(call) for call in batches(facts, 2, lambda fact: owner[id(fact)])] == [3, 1]
    assert [len(call) for call in batches(facts, 1)] == [1, 1, 1, 1]  # without units, the case would split
    portability = multi_hop_cases(cases)
    assert [case.case_id for case in cases_in(portability, calls[0])] == [11]
    assert cases_in(portability, calls[1] + calls[2]) == portability[1:]
    with pytest.raises(ValueError, match="case 11: only 1 of its 2 rewrites"):
        cases_in(portability, facts[:1])


def test_per_call_portability_reads_merge_to_one_read(tiny_llama, tmp_path):
    from editing.protocol import score_now
    from editing.scoring import absent_metrics, scoring

    cases = mquake_cases(write(tmp_path / "mquake.json", mquake_records()))
    facts = [fact for case in cases for fact in case.edits]
    absent = absent_metrics(facts)
    assert absent == {"generalization", "locality"}  # MQuAKE has neither
    scorings = [with_portability(scoring(name, absent), multi_hop_cases(cases)) for name in ("token", "generated")]
    whole = score_now(tiny_llama, facts, scorings)
    for s in scorings:
        parts = [s.read(tiny_llama, call, s.record(tiny_llama, call, facts), facts) for call in (facts[:2], facts[2:])]
        assert s.merge(parts) == pytest.approx(whole[s.name])
        assert "generalization" not in whole[s.name] and "locality" not in whole[s.name]
        assert whole[s.name]["n_portability_cases"] == 3 and whole[s.name]["n_portability_questions"] == 9
    assert list(scorings[0].columns) == ["Rel", "Port", "Port-case"]
    assert list(scorings[1].columns) == ["gen-Rel", "gen-Port", "gen-Port-case"]
    assert with_portability(scoring("probability"), multi_hop_cases(cases)).columns == scoring("probability").columns


# --- the command ---------------------------------------------------------------------------------------------


def run(tiny_llama, tmp_path, monkeypatch, dataset: str, *extra: str) -> tuple[str, dict]:
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    out = tmp_path / "out"
    assert main(["grace", "--model", "tiny-llama", "--dataset", dataset, "--set", "n_iter=30", "--set", "edit_lr=0.5",
                 "--out-dir", str(out), *extra]) == 0
    return (out / "evaluate_grace.md").read_text(), json.loads((out / "evaluate_grace.json").read_text())


@pytest.mark.parametrize("protocol", ["after_all", "after_each"])
def test_mquake_through_the_command_edits_whole_cases_and_moves_portability_up(tiny_llama, tmp_path, monkeypatch,
                                                                              capsys, protocol):
    """GRACE answers its own edit prompts; case 12 and 13's first question is an edit prompt, so after the edit
    those cases count as answered, and the unedited row (scored before any edit) does not say the new answers."""
    dataset = write(tmp_path / "mquake.json", mquake_records())
    table, record = run(tiny_llama, tmp_path, monkeypatch, dataset, "-n", "3", "--sequential", "--batch", "1",
                        "--protocol", protocol)
    assert (record["n_cases"], record["n_edits"], record["calls"]) == (3, 4, 3)  # one call per case, not per rewrite
    assert record["absent_metrics"] == ["generalization", "locality"]
    assert [case["case_id"] for case in record["portability"]] == [11, 12, 13]
    assert "3 MQuAKE cases (4 rewrites) in sequential calls of 1 case, scored" in table
    headers = [line for line in table.splitlines() if "scoring:" in line]
    assert headers == [f"| grace · {protocol} · scoring: probability | ES | EM |",
                       f"| grace · {protocol} · scoring: token | Rel | Port | Port-case |",
                       f"| grace · {protocol} · scoring: generated | gen-Rel | gen-Port | gen-Port-case |"]
    assert "nan" not in table.lower() and "–" not in table
    for name in ("token", "generated"):
        before, after = record["unedited"][name], record["edited"][name]
        assert before["n_portability_cases"] == after["n_portability_cases"] == 3
        assert before["n_portability_questions"] == after["n_portability_questions"] == 9
        assert after["portability_case"] >= 2 / 3 > before["portability_case"]
        assert after["portability"] > before["portability"]
        assert after["portability_case"] >= after["portability"]
    # the unedited row, a second way
    cases = multi_hop_cases(mquake_cases(dataset))
    assert record["unedited"]["token"]["portability"] == pytest.approx(np.mean(
        [max(token_accuracy_by_hand(tiny_llama, q, a) for a in answers)
         for case in cases for q, answers in zip(case.questions, case.answers)]))
    rows = [line for line in table.split("scoring: token")[1].splitlines()[2:4]]
    assert rows[0].startswith("| unedited |") and rows[1].startswith("| grace (4 edits) |")
    assert rows[1].split("|")[-3].strip() == f"{100 * record['edited']['token']['portability']:.1f}"


def test_knowedit_portability_columns_and_none_for_counterfact(tiny_llama, tmp_path, monkeypatch):
    knowedit = [{"subject": subject, "target_new": new, "prompt": f"{subject} belongs to the family",
                 "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": f"The family of {subject} is",
                 "locality": {"Relation_Specificity": [{"prompt": f"The taxon rank of {subject} is",
                                                        "ground_truth": ["genus"]}]},
                 "portability": {"Reasoning": [{"prompt": f"{subject} belongs to the family", "ground_truth": new},
                                               {"prompt": f"The common name of {subject}'s family is",
                                                "ground_truth": "owlet moths"}]}}
                for subject, new in (("Epaspidoceras", "moths"), ("Aspidites", "snakes"))]
    table, record = run(tiny_llama, tmp_path, monkeypatch, write(tmp_path / "knowedit.json", knowedit), "-n", "2")
    assert "| grace · one call · scoring: token | Rel | Gen | Loc | Port | Port-case |" in table
    assert "| grace · one call · scoring: generated | gen-Rel | gen-Gen | gen-Loc | gen-Port | gen-Port-case |" in table
    assert record["absent_metrics"] == [] and "n_cases" not in record
    for row in ("unedited", "edited"):
        assert record[row]["token"]["n_portability_questions"] == 4
        assert record[row]["generated"]["n_portability_cases"] == 2
    edited, unedited = record["edited"]["token"], record["unedited"]["token"]
    assert edited["portability_case"] == 1.0 > unedited["portability_case"]  # the first probe is the edit prompt
    assert edited["portability_case"] >= edited["reliability"] and edited["portability"] > unedited["portability"]

    counterfact = [{"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                                        "target_new": {"str": "English"}, "target_true": {"str": "French"}},
                    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
                    "neighborhood_prompts": ["The mother tongue of Léon Blum is"]}]
    table, record = run(tiny_llama, tmp_path, monkeypatch, write(tmp_path / "cf.json", counterfact), "-n", "1")
    assert "Port" not in table and "portability" not in record
    assert not any("portability" in key for row in ("unedited", "edited") for s in record[row].values() for key in s)


def test_mquake_cases_that_reuse_an_edited_subject_are_left_out(tiny_llama, tmp_path, monkeypatch, capsys):
    """One MEMIT key per subject in a call: a case editing a subject an earlier case edits is skipped, whole."""
    from editing.evaluation_command import one_case_per_subject

    again = {**mquake_records()[2], "case_id": 14,
             "requested_rewrite": [rewrite("Libya", "The language of {} is", "Arabic", "Latin")]}
    dataset = write(tmp_path / "mquake.json", [*mquake_records(), again])
    assert [case.case_id for case in one_case_per_subject(mquake_cases(dataset))] == [11, 12, 13]
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    with pytest.raises(SystemExit):
        main(["grace", "--model", "tiny-llama", "--dataset", dataset, "-n", "4", "--out-dir", str(tmp_path / "o")])
    assert "has 3 MQuAKE cases whose rewrites edit distinct subjects; -n 4 is too many" in capsys.readouterr().err
