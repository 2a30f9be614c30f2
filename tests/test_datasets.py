"""Datasets by name or file: each record shape becomes the right facts, downloads land in the cache once,
offline failures are fast and say where to put the file, and bad records are named before anything loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tracing import dataset_sources
from tracing.dataset_sources import DATASETS, DatasetSource, dataset_source
from tracing.datasets import (DatasetUnavailableError, UnknownDatasetError, dataset_path, detect_shape,
                              load_dataset, mquake_cases)
from tracing.facts import InvalidRecordError, load_facts

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once

COUNTERFACT = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "subject": "Danielle Darrieux", "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
MQUAKE = {
    "case_id": 2500,
    "requested_rewrite": [
        {"prompt": "{} is a citizen of", "relation_id": "P27", "subject": "Vince McMahon",
         "target_new": {"str": "Libya", "id": "Q1016"},
         "target_true": {"str": "United States of America", "id": "Q30"},
         "question": "What is the country of citizenship of Vince McMahon?"},
        {"prompt": "The capital of {} is", "relation_id": "P36", "subject": "Libya",
         "target_new": {"str": "Franklin", "id": "Q1"}, "target_true": {"str": "Tripoli", "id": "Q3579"}},
    ],
    "questions": ["What city is the capital of the country where the CEO of Triple H is a citizen?",
                  "In which city is the capital of the country of citizenship of Triple H's CEO?"],
    "answer": "Washington, D.C.", "answer_alias": ["Washington"],
    "new_answer": "Franklin", "new_answer_alias": ["Franklin, Kentucky"],
}
KNOWEDIT_ZSRE = {
    "subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]},
    "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?",
                                   "ground_truth": "Owlet moths"}]},
}
KNOWEDIT_COUNTERFACT = {
    "subject": "Frederic Piesch", "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of León, Mexico", "ground_truth": "mayor of Vienna",
    "portability": {"Subject_Aliasing": [{"prompt": "The name of the position held by Frederic of Pieschen is",
                                          "ground_truth": "Archbishop of León, Mexico"}]},
    "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
                 "Forgetfulness": [{"prompt": "The position held by Frederic Piesch, which is not X, is",
                                    "ground_truth": "mayor of Vienna"}]},
}
KNOWEDIT_RECENT = {  # knowledge insertion: no ground_truth; answers as lists of alternatives
    "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
    "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Leo Arons is",
                                           "ground_truth": [["Albert Arons"]]}]},
}
WIKIBIO = {
    "text": "This is a Wikipedia passage about john russell reynolds. Sir John Russell Reynolds was a neurologist.",
    "labels": "He was educated at University College, London.", "concept": "john russell reynolds",
    "locality": {"Relation_Specificity": [{"prompt": "The field of work of john russell reynolds is",
                                           "ground_truth": ["medicine"]}]},
}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder of this test's own."""
    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "datasets"


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over ``tmp_path/www`` that counts the requests it answers (method, path)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[tuple[str, str]] = []

    class Handler(SimpleHTTPRequestHandler):
        def send_head(self):
            requests.append((self.command, self.path))
            return super().send_head()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


def point(monkeypatch, name: str, **where) -> DatasetSource:
    """Point the registered dataset ``name`` somewhere else (a local server, an unreachable address)."""
    source = dataclasses.replace(DATASETS[name], **where)
    monkeypatch.setitem(DATASETS, name, source)
    return source


# --- shapes ------------------------------------------------------------------------------------------------


def test_counterfact_and_zsre_files_load_as_load_facts_reads_them(tmp_path, cache):
    for name, records in (("cf.json", [COUNTERFACT]), ("zsre.json", [ZSRE])):
        path = write(tmp_path / name, records)
        assert load_dataset(path) == load_facts(path)
    [fact] = load_dataset(tmp_path / "cf.json")
    assert (fact.prompt, fact.target_true, fact.target_new) == ("The mother tongue of Danielle Darrieux is", "French",
                                                                "English")
    [fact] = load_dataset(str(tmp_path / "zsre.json"))  # a str that is no dataset name is a path
    assert fact.template == "What university did {} attend?" and fact.target_new == "University of Michigan"


def test_mquake_gives_one_fact_per_rewrite_and_keeps_the_multi_hop_questions(tmp_path, cache):
    second = {**MQUAKE, "case_id": 7, "requested_rewrite": MQUAKE["requested_rewrite"][:1]}
    path = write(tmp_path / "mquake.json", [MQUAKE, second])
    facts = load_dataset(path)
    assert [(f.prompt, f.target_true, f.target_new, f.case_id) for f in facts] == [
        ("Vince McMahon is a citizen of", "United States of America", "Libya", 2500),
        ("The capital of Libya is", "Tripoli", "Franklin", 2500),
        ("Vince McMahon is a citizen of", "United States of America", "Libya", 7),
    ]
    assert facts[0].relation == "P27" and facts[0].extra["question"].startswith("What is the country")
    assert len(load_dataset(path, limit=1)) == 2  # limit counts records (cases), each with all its rewrites
    cases = mquake_cases(path)
    assert [len(case.edits) for case in cases] == [2, 1]
    assert cases[0].questions == tuple(MQUAKE["questions"])
    assert (cases[0].answer, cases[0].new_answer, cases[0].new_answer_aliases) == ("Washington, D.C.", "Franklin",
                                                                                  ("Franklin, Kentucky",))
    assert cases[0].edits == tuple(facts[:2])
    with pytest.raises(ValueError, match="counterfact records, not MQuAKE"):
        mquake_cases(write(tmp_path / "cf.json", [COUNTERFACT]))


def test_knowedit_subsets(tmp_path, cache):
    path = write(tmp_path / "knowedit.json", [KNOWEDIT_ZSRE, KNOWEDIT_COUNTERFACT, KNOWEDIT_RECENT, WIKIBIO])
    zsre, counterfact, recent, wikibio = load_dataset(path)
    assert zsre.template == "Which family does {} belong to?"
    assert (zsre.target_true, zsre.target_new) == ("Aspidoceratidae", "Noctuidae")
    assert zsre.paraphrases == ("What family are Epaspidoceras?",)
    assert zsre.locality == (("The taxon rank of Epaspidoceras is", "genus"),)
    assert zsre.extra["portability"] == {"Reasoning": [["What is the common name for the family Epaspidoceras "
                                                        "belongs to?", "Owlet moths"]]}
    assert counterfact.target_true == "mayor of Vienna" and len(counterfact.locality) == 2  # both locality kinds
    assert recent.target_true == "" and recent.locality == (("The name of the father of Leo Arons is",
                                                             "Albert Arons"),)
    assert wikibio.subject == "john russell reynolds" and wikibio.target_new.startswith("He was educated")
    assert wikibio.prompt == WIKIBIO["text"] and wikibio.template.count("{}") == 1
    assert [f.case_id for f in (zsre, counterfact, recent, wikibio)] == [0, 1, 2, 3]


def test_shape_detection_and_unknown_inputs(tmp_path, cache):
    assert [detect_shape(r) for r in (COUNTERFACT, ZSRE, MQUAKE, KNOWEDIT_ZSRE, WIKIBIO, {"question": "?"})] == [
        "counterfact", "zsre", "mquake", "knowedit", "knowedit", None]
    with pytest.raises(ValueError, match="neither CounterFact"):
        load_dataset(write(tmp_path / "other.json", [{"question": "?"}]))
    with pytest.raises(UnknownDatasetError, match="neither a file nor a dataset name.*counterfact"):
        load_dataset("no-such-dataset")
    assert dataset_source("Multi-CounterFact").name == "multi_counterfact"
    assert dataset_source("KNOWEDIT_ZSRE").name == "knowedit-zsre"
    with pytest.raises(ValueError, match="knowedit-convsent.*cannot be loaded as facts.*sentiment"):
        load_dataset("knowedit-convsent")
    assert not cache.exists()  # refusing a name downloads nothing


def test_every_registered_dataset_has_a_source_and_a_known_shape():
    assert {"counterfact", "multi_counterfact", "zsre", "mquake", "knowedit-zsre", "knowedit-wiki-counterfact",
            "knowedit-wiki-recent", "knowedit-wikibio"} <= set(DATASETS)
    for source in DATASETS.values():
        assert source.location.startswith("https://") and source.location.endswith(".json"), source
        assert source.shape in (*dataset_sources.SHAPES, None)
    assert DATASETS["zsre"].url.endswith("/data/dsets/zsre_mem_eval.json")
    assert DATASETS["knowedit-zsre"].location == ("https://huggingface.co/datasets/zjunlp/KnowEdit/resolve/main/"
                                                  "benchmark/ZsRE/ZsRE-test-all.json")


# --- bad records -------------------------------------------------------------------------------------------


def test_bad_records_are_named_with_dataset_index_and_field(tmp_path, cache):
    no_subject = json.loads(json.dumps(COUNTERFACT))
    del no_subject["requested_rewrite"]["subject"]
    no_target = json.loads(json.dumps(COUNTERFACT))
    no_target["requested_rewrite"]["target_true"] = {"id": "Q150"}
    no_slot = json.loads(json.dumps(COUNTERFACT))
    no_slot["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    path = write(tmp_path / "cf.json", [COUNTERFACT, no_subject, COUNTERFACT, no_target, no_slot])
    with pytest.raises(InvalidRecordError) as refused:
        load_dataset(path)
    message = str(refused.value)
    assert f"dataset '{path}': 3 record(s)" in message and "nothing was loaded" in message
    assert "record 1: missing field 'requested_rewrite.subject'" in message
    assert "record 3: missing field 'requested_rewrite.target_true.str'" not in message  # {"id"} only: not a text
    assert "record 3: field 'requested_rewrite.target_true' is not a non-empty text" in message
    assert "record 4: field 'requested_rewrite.prompt'" in message and "no single '{}' slot" in message
    assert "record 0" not in message and "record 2" not in message
    with pytest.warns(UserWarning, match="left out 3 record"):
        kept = load_dataset(path, skip_invalid=True)
    assert [f.subject for f in kept] == ["Danielle Darrieux"] * 2


@pytest.mark.parametrize("shape, record, field_error", [
    ("zsre", {**ZSRE, "subject": "Nobody"}, "field 'subject' ('Nobody') does not occur in field 'src'"),
    ("zsre", {k: v for k, v in ZSRE.items() if k != "alt"}, "missing field 'alt'"),
    ("zsre", {**ZSRE, "alt": "Illinois Institute of Technology"}, "field 'alt'"),
    ("knowedit", {**KNOWEDIT_ZSRE, "subject": "Nobody"}, "field 'subject' ('Nobody') does not occur in field 'prompt'"),
    ("knowedit", {k: v for k, v in KNOWEDIT_ZSRE.items() if k != "target_new"}, "missing field 'target_new'"),
    ("knowedit", {**KNOWEDIT_ZSRE, "locality": {"Relation_Specificity": [{"prompt": "The rank is"}]}},
     "missing field 'locality.Relation_Specificity.0.ground_truth'"),
    ("mquake", {**MQUAKE, "requested_rewrite": [MQUAKE["requested_rewrite"][0], {"prompt": "{} is in"}]},
     "missing field 'requested_rewrite.1.subject'"),
    ("mquake", {k: v for k, v in MQUAKE.items() if k != "new_answer"}, "missing field 'new_answer'"),
])
def test_each_shape_names_the_bad_field(tmp_path, cache, shape, record, field_error):
    good = {"zsre": ZSRE, "knowedit": KNOWEDIT_ZSRE, "mquake": MQUAKE}[shape]
    path = write(tmp_path / f"{shape}.json", [good, record])
    with pytest.raises(InvalidRecordError, match="record 1: " + field_error.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(path)
    assert len(load_dataset(path, limit=1)) >= 1  # the good record alone loads


# --- downloads ---------------------------------------------------------------------------------------------


def test_download_lands_in_the_cache_once(server, cache, monkeypatch):
    url, root, requests = server
    write(root / "cf.json", [COUNTERFACT, COUNTERFACT])
    point(monkeypatch, "counterfact", url=f"{url}/cf.json")
    facts = load_dataset("counterfact")
    assert len(facts) == 2 and facts[0].subject == "Danielle Darrieux"
    assert requests == [("GET", "/cf.json")]
    cached = cache / "counterfact.json"
    assert cached.read_bytes() == (root / "cf.json").read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["counterfact.json"]  # no temporaries left
    assert load_dataset("counterfact", limit=1) == facts[:1] and dataset_path("counterfact") == cached
    assert requests == [("GET", "/cf.json")]  # the second load made no request


def test_a_failed_download_leaves_nothing_in_the_cache(server, cache, monkeypatch):
    url, root, requests = server
    point(monkeypatch, "zsre", url=f"{url}/missing.json")
    with pytest.raises(DatasetUnavailableError, match="404"):
        load_dataset("zsre")
    assert requests == [("GET", "/missing.json")]
    assert not cache.exists() or list(cache.iterdir()) == []


def test_hub_file_download_through_huggingface_hub(server, cache, monkeypatch):
    """The Hub path, against a local server that answers like the Hub's resolve endpoint."""
    url, root, requests = server
    content = json.dumps([KNOWEDIT_ZSRE]).encode()
    commit = "0123456789abcdef0123456789abcdef01234567"

    class HubHandler(SimpleHTTPRequestHandler):
        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def answer(self, body: bool):
            requests.append((self.command, self.path))
            expected = "/datasets/zjunlp/KnowEdit/resolve/main/benchmark/ZsRE/ZsRE-test-all.json"
            if self.path != expected:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if body:
                self.wfile.write(content)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        point(monkeypatch, "knowedit-zsre", hub_endpoint=f"http://127.0.0.1:{httpd.server_address[1]}")
        [fact] = load_dataset("knowedit-zsre")
        assert fact.target_new == "Noctuidae"
        assert (cache / "knowedit-zsre.json").read_bytes() == content
        assert sorted(p.name for p in cache.iterdir()) == ["knowedit-zsre.json"]
        seen = len(requests)
        assert load_dataset("knowedit-zsre") == [fact] and len(requests) == seen  # cached: no request
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_offline_and_not_cached_fails_fast_naming_the_dataset_url_and_path(cache, monkeypatch):
    source = point(monkeypatch, "counterfact", url=f"{UNREACHABLE}/x.json")
    hub = point(monkeypatch, "knowedit-wiki-recent", hub_endpoint=UNREACHABLE)
    for name, where in (("counterfact", source.url), ("knowedit-wiki-recent", hub.location)):
        start = time.perf_counter()
        with pytest.raises(DatasetUnavailableError) as refused:
            load_dataset(name)
        assert time.perf_counter() - start < 3.0
        message = str(refused.value)
        assert f"dataset {name!r}" in message and where in message
        assert f"put it at {cache / (name + '.json')}" in message and "ConnectionRefusedError" in message
    assert not cache.exists() or list(cache.iterdir()) == []
    (cache / "counterfact.json").parent.mkdir(parents=True, exist_ok=True)
    write(cache / "counterfact.json", [COUNTERFACT])  # the file put where the message says: used, offline
    assert load_dataset("counterfact")[0].subject == "Danielle Darrieux"


def test_command_line_takes_a_dataset_name(cache, monkeypatch, capsys):
    from editing.memit import main

    point(monkeypatch, "counterfact", url=f"{UNREACHABLE}/x.json")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main(["tiny-llama", "--facts", "counterfact"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and time.perf_counter() - start < 3.0
    assert err.startswith("error: dataset 'counterfact' is not in the cache") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["tiny-llama", "--facts", "no-such-dataset"])
    assert "is no dataset name (known: counterfact, multi_counterfact" in capsys.readouterr().err
