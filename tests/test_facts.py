import json

import pytest

from tracing.candidates import unused_fact_prompts
from tracing.facts import Fact, fact_from_prompt, known_facts, load_facts, save_facts
from tracing.tokens import SubjectNotFoundError

COUNTERFACT_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

ZSRE_RECORD = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}


def test_counterfact_round_trip(tmp_path):
    fact = Fact.from_counterfact(COUNTERFACT_RECORD)
    assert fact.prompt == "The mother tongue of Danielle Darrieux is"
    assert (fact.target_true, fact.target_new, fact.relation, fact.case_id) == ("French", "English", "P103", 7)
    assert fact.neighborhood == ("The mother tongue of Léon Blum is",)
    path = tmp_path / "cf.json"
    save_facts([fact], path)
    [again] = load_facts(path)
    assert again == fact
    assert json.loads(path.read_text())[0]["attribute_prompts"] == COUNTERFACT_RECORD["attribute_prompts"]


def test_zsre_record(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([ZSRE_RECORD]))
    [fact] = load_facts(path)
    assert fact.prompt == ZSRE_RECORD["src"]
    assert fact.template == "What university did {} attend?"
    assert fact.target_new == "University of Michigan" and fact.target_true == "Illinois Institute of Technology"
    assert fact.paraphrases == (ZSRE_RECORD["rephrase"],)
    assert fact.locality == (("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving"),)


def test_json_lines_and_unknown_format(tmp_path):
    lines = tmp_path / "cf.jsonl"
    lines.write_text(json.dumps(COUNTERFACT_RECORD) + "\n" + json.dumps(COUNTERFACT_RECORD) + "\n")
    assert len(load_facts(lines)) == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(ValueError, match="neither CounterFact"):
        load_facts(other)


def test_bad_facts_are_refused():
    with pytest.raises(ValueError, match="slot"):
        Fact(subject="Germany", template="The capital of Germany is", target_true="Berlin")
    with pytest.raises(ValueError, match="subject"):
        Fact(subject=" ", template="{} is", target_true="x")
    with pytest.raises(SubjectNotFoundError):
        Fact.from_zsre({**ZSRE_RECORD, "subject": "Nobody"})


def test_fact_from_prompt():
    fact = fact_from_prompt("The Eiffel Tower is in", "Eiffel Tower", "Paris")
    assert fact.template == "The {} is in" and fact.prompt == "The Eiffel Tower is in"


def test_bundled_known_facts_are_well_formed():
    facts = known_facts()
    assert len(facts) >= 100
    assert len({(f.subject, f.template) for f in facts}) == len(facts)
    for fact in facts:
        assert fact.target_new and fact.target_new != fact.target_true
        assert fact.subject in fact.prompt
    assert len({f.relation for f in facts}) >= 5


def test_unused_fact_prompts_are_fact_shaped_and_read_by_no_bundled_record():
    unused = unused_fact_prompts()
    assert len(unused) > 1000 and len(set(unused)) == len(unused)
    used = set()
    for fact in known_facts():
        used.update([fact.prompt, *fact.paraphrases, *fact.neighborhood, *(p for p, _ in fact.locality)])
    assert not used & set(unused)
    # each is a bundled relation's template with another subject in its slot
    templates = {tuple(fact.template.split("{}")) for fact in known_facts()}
    assert all(any(p.startswith(before) and p.endswith(after) and len(p) > len(before) + len(after)
                   for before, after in templates) for p in unused)


def test_atomic_writes_leave_normal_permissions(tmp_path):
    import os
    import stat

    from tracing.io import write_text_atomic

    path = tmp_path / "x.txt"
    write_text_atomic(path, "hello")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert path.read_text() == "hello" and mode & 0o044  # readable by others, like open() would make it
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary file left behind


def test_tensor_files_round_trip_and_refuse_foreign_files(tmp_path):
    import pytest
    import torch

    from tracing.io import load_tensors, save_tensors_atomic

    tensors = {"delta.3": torch.randn(4, 5), "mask": torch.tensor([1, 0, 1], dtype=torch.uint8)}
    path = save_tensors_atomic(tmp_path / "edit.safetensors", tensors, "factlens", {"layers": [3]})
    loaded, meta = load_tensors(path, "factlens")
    assert meta == {"layers": [3]} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="not a 'factlens_wise' file"):
        load_tensors(path, "factlens_wise")
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]
