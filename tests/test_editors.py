"""Every registered editing method through the one editor interface, on a tiny model: an edit moves the
edited prompt's prediction, undo gives back the unedited weights and outputs bit for bit, and save -> load
gives the same predictions on a fresh start."""

import dataclasses

import pytest
import torch

from editing.alphaedit import AlphaEditConfig
from editing.covariance import CorpusConfig
from editing.editor import Editor, create_editor, load_editor, method, methods
from editing.grace import GraceConfig
from editing.memit import MemitConfig
from editing.rome import RomeConfig
from editing.subject_memory import SubjectMemoryConfig
from editing.wise import WiseConfig, WiseEasyEditConfig
from tracing.facts import Fact
from tracing.layer_set import LayerSet
from tracing.tokens import encode, target_token_ids
from conftest import weights_digest

CORPUS = CorpusConfig(samples=48, max_tokens=24, batch_size=16)
# settings that make each method's edit take on a tiny random model in a few seconds
CONFIGS = {
    "memit": MemitConfig(layers=(1, 2), mom2_weight=1.0, corpus=CORPUS, show_progress=False),
    "rome": RomeConfig(layers=(2,), mom2_weight=1.0, corpus=CORPUS, show_progress=False),
    "wise": WiseConfig(n_iter=60, edit_lr=0.3, mask_ratio=1.0, norm_constraint=10.0, alpha=10.0, beta=40.0,
                       gamma=20.0, corrupted_samples=4, subject_negatives=0, relation_negatives=0,
                       subject_prefix=False, negatives=16, calibration=16),
    # EasyEdit's algorithm with the tiny model's step size and score scale
    "wise-easyedit": WiseEasyEditConfig(n_iter=60, edit_lr=0.3, mask_ratio=1.0, norm_constraint=10.0, alpha=10.0,
                                        beta=40.0, gamma=20.0),
    "grace": GraceConfig(n_iter=30, edit_lr=0.5),
    # the tiny model's C0 has no eigenvalue below the papers' 2e-2: a threshold that leaves a null space
    "alphaedit": AlphaEditConfig(layers=(1, 2), corpus=CORPUS, show_progress=False, nullspace_threshold=3.0, l2=0.1),
    # a random model has no subject identity across contexts: key on the bare prompt alone
    "subject-memory": SubjectMemoryConfig(layer=2, calibration=32, context_prefixes=(), answer_logprob=None),
}
FACTS = [Fact("Eiffel Tower", "The {} is located in the city of", "Paris", "Rome"),
         Fact("Germany", "The capital of {} is", "Berlin", "Madrid")]
OTHER = ["My favourite food is", "The weather today is"]


def last_logits(model, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(torch.tensor([encode(model, p)]))[0, -1] for p in prompts])


def p_new(model, fact) -> float:
    return float(torch.softmax(last_logits(model, [fact.prompt])[0].float(), -1)[target_token_ids(model, fact.target_new)[0]])


def test_the_registry_has_every_builtin_method_with_its_config():
    assert set(methods()) >= {"memit", "rome", "wise", "grace"}
    assert set(CONFIGS) == set(methods()), "a registered method without a test config here"
    assert method("wise").lifelong and not method("memit").lifelong
    with pytest.raises(ValueError, match="unknown editing method 'alphaedit2'.*grace.*memit"):
        method("alphaedit2")
    with pytest.raises(TypeError, match="memit takes a MemitConfig, got WiseConfig"):
        create_editor("memit", None, WiseConfig())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_edit_undo_save_load_through_the_interface(tiny_llama, name, tmp_path):
    model, config = tiny_llama, CONFIGS[name]
    weights, clean = weights_digest(model), last_logits(model, [f.prompt for f in FACTS] + OTHER)
    before = [p_new(model, f) for f in FACTS]

    editor = create_editor(name, model, config)
    assert isinstance(editor, Editor) and editor.method == name
    try:
        editor.edit(FACTS)
        assert editor.facts == FACTS
        after = [p_new(model, f) for f in FACTS]
        assert all(a > 2 * b for a, b in zip(after, before)), (before, after)  # the edits took
        if editor.routes:
            routes = editor.route([FACTS[0].prompt, *OTHER])
            assert routes[0].memory is not None and routes[0].prompt == FACTS[0].prompt
        else:
            with pytest.raises(NotImplementedError):
                editor.route(OTHER)
        edited = last_logits(model, [f.prompt for f in FACTS] + OTHER)
        path = editor.save(tmp_path / f"{name}.safetensors")
    finally:
        editor.undo()
    assert weights_digest(model) == weights and torch.equal(last_logits(model, [f.prompt for f in FACTS] + OTHER), clean)

    loaded = load_editor(name, path, model)
    try:
        assert loaded.facts == FACTS
        reloaded = last_logits(model, [f.prompt for f in FACTS] + OTHER)
        assert torch.equal(reloaded.argmax(-1), edited.argmax(-1))
        torch.testing.assert_close(reloaded, edited, rtol=1e-5, atol=1e-5)
    finally:
        loaded.undo()
    assert weights_digest(model) == weights


def test_a_weight_edit_records_where_its_layers_came_from(tiny_llama):
    chosen = LayerSet((2, 1), "traced", "12 facts, peak-end, peak 2")
    editor = create_editor("memit", tiny_llama, dataclasses.replace(CONFIGS["memit"], layers=chosen))
    try:
        edit = editor.edit(FACTS[0])
        assert edit.layers == (1, 2)
        assert edit.config["layer_source"] == {"source": "traced", "detail": "12 facts, peak-end, peak 2"}
    finally:
        editor.undo()
    rome = create_editor("rome", tiny_llama, dataclasses.replace(CONFIGS["rome"], layers=chosen))
    with pytest.raises(ValueError, match="ROME edits one layer"):
        rome.edit(FACTS[0])


def test_a_refused_request_changes_nothing_and_the_editor_goes_on(tiny_llama):
    weights = weights_digest(tiny_llama)
    for name in sorted(CONFIGS):
        editor = create_editor(name, tiny_llama, CONFIGS[name])
        try:
            bad = Fact("Colosseum", "The {} is located in the city of", "Rome", "")  # empty target
            with pytest.raises(ValueError):
                editor.edit([FACTS[0], bad])
            assert editor.facts == [] and weights_digest(tiny_llama) == weights
        finally:
            editor.undo()
    assert weights_digest(tiny_llama) == weights


def test_the_lifelong_benchmark_runs_any_registered_method_under_both_protocols(tiny_llama):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import run_stream

    weights = weights_digest(tiny_llama)
    from tracing.facts import known_facts, one_per_subject

    facts = one_per_subject(known_facts())[:3]  # with locality prompts
    rows = {protocol: run_stream(tiny_llama, "grace", CONFIGS["grace"], facts, 2, protocol, facts[:1])[-1]
            for protocol in ("after_all", "after_each")}
    from editing.evaluate import evaluate_accuracy, locality_predictions

    unedited = evaluate_accuracy(tiny_llama, facts, locality_predictions(tiny_llama, facts))
    for row in rows.values():
        assert row["reliability"] > unedited.reliability + 0.3  # the codebook answers its own edit prompts
        assert 0.0 <= row["locality"] <= 1.0 and row["routed"] == 1.0 and row["s_per_edit"] > 0
        assert 0.0 < row["routed_and_answered"] <= row["routed"]
    assert weights_digest(tiny_llama) == weights


def test_the_notebook_import_surface_resolves_every_name():
    import editing
    import tracing

    for package in (tracing, editing):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
    assert tracing.trace_prompt.__module__ == "tracing.causal_trace"
    assert editing.create_editor is create_editor


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_stream_refuses_bad_calls_naming_the_fact_and_goes_on(tiny_llama, name):
    """An empty target and a fact edited earlier in the stream with another target: each call is refused
    before anything changes, and the next good call works. (A fact whose subject is not in its prompt cannot
    be made: Fact and fact_from_prompt refuse it, see test_bad_inputs.)"""
    editor = create_editor(name, tiny_llama, CONFIGS[name])
    try:
        editor.edit(FACTS[0])
        state = last_logits(tiny_llama, [f.prompt for f in FACTS] + OTHER)
        bad_calls = {
            "request 1 \\('Colosseum'\\): empty target_new": Fact("Colosseum", "The {} is located in the city of", "Rome", " "),
            "request 1 \\('Eiffel Tower'\\): already edited to 'Rome' earlier in this stream": dataclasses.replace(FACTS[0], target_new="Lyon"),
        }
        for needle, bad in bad_calls.items():
            with pytest.raises(ValueError, match=needle):
                editor.edit([FACTS[1], bad])
            assert editor.facts == [FACTS[0]]
            assert torch.equal(last_logits(tiny_llama, [f.prompt for f in FACTS] + OTHER), state)
        editor.edit(FACTS[1])  # the stream goes on
        assert editor.facts == FACTS
    finally:
        editor.undo()


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if method(n).lifelong))
def test_a_long_stream_keeps_weights_and_logits_finite(tiny_llama, name):
    """40 sequential edits (calls of 4) of every lifelong method: nothing NaN or inf anywhere."""
    facts = [Fact(f"Person {i}", "{} was born in the city of", "Paris", f"Town{i % 7}") for i in range(40)]
    config = CONFIGS[name]
    if name in ("wise", "wise-easyedit"):
        config = dataclasses.replace(config, n_iter=3, save_freq=8, merge_freq=16)
    elif name == "grace":
        config = dataclasses.replace(config, n_iter=3)
    else:
        config = dataclasses.replace(config, targets=dataclasses.replace(config.targets, steps=3))
    editor = create_editor(name, tiny_llama, config)
    try:
        for start in range(0, len(facts), 4):
            editor.edit(facts[start: start + 4])
        logits = last_logits(tiny_llama, [f.prompt for f in facts] + OTHER)
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(t).all() for t in tiny_llama.state_dict().values())
        stored = [getattr(editor, a) for a in ("deltas", "values", "keys") if isinstance(getattr(editor, a, None), torch.Tensor)]
        stored += [m.delta for m in getattr(editor, "memories", [])]
        stored += [d for edit in getattr(editor, "edits", []) for d in edit.deltas.values()]
        assert stored and all(torch.isfinite(t).all() for t in stored)
        assert len(editor.facts) == 40
    finally:
        editor.undo()


def test_both_protocols_score_locality_on_the_same_unedited_prompts(tiny_llama):
    """Locality prompts edited by any call of the run are left out under both protocols, against the
    unedited model's answers recorded before the first edit (a fact's locality prompt edited in a later
    call used to break the after-all baseline)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import run_stream

    from editing.evaluate import locality_pairs

    first = Fact("Germany", "The capital of {} is", "Berlin", "Madrid", paraphrases=("Germany's capital is",),
                 locality=(("The capital of France is", "Paris"),))
    second = Fact("France", "The capital of {} is", "Paris", "Rome", paraphrases=("France's capital is",),
                  locality=(("The capital of Spain is", "Madrid"),))
    assert locality_pairs([first]) == [("The capital of France is", "Paris")]
    assert locality_pairs([first], [first, second]) == []  # France is edited in the run: left out
    for protocol in ("after_all", "after_each"):
        [row] = run_stream(tiny_llama, "grace", CONFIGS["grace"], [first, second], 1, protocol, [first])
        assert row["locality"] == 1.0  # only Spain is scored, and GRACE leaves it alone
        # the held-out prompt names Germany, edited in the run: no prompt is left for the other-subjects column
        assert row["n_unrelated_other_subjects"] == 0 and row["unrelated_other_subjects"] is None
        assert row["n_locality_other_subjects"] == 1 and row["locality_other_subjects"] == 1.0


def test_one_stream_checkpoints_score_as_separate_runs(tiny_llama):
    """Scoring the first T facts on the way through a longer stream gives the row a run of T gives."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import run_stream

    from tracing.facts import known_facts, one_per_subject

    facts, held_out = one_per_subject(known_facts())[:4], one_per_subject(known_facts())[10:12]
    seen = []
    stream = run_stream(tiny_llama, "grace", CONFIGS["grace"], facts, 2, "after_all", held_out, [2, 4], seen.append)
    assert seen == stream  # each row handed over as it is measured
    alone = run_stream(tiny_llama, "grace", CONFIGS["grace"], facts[:2], 2, "after_all", held_out)[0]
    assert [row["T"] for row in stream] == [2, 4]
    for key in ("reliability", "generalization", "locality", "unrelated", "routed"):
        assert stream[0][key] == alone[key], key
    with pytest.raises(ValueError, match="between calls"):
        run_stream(tiny_llama, "grace", CONFIGS["grace"], facts, 2, "after_all", held_out, [3, 4])


def test_the_lifelong_benchmark_tells_prompts_that_name_an_edited_subject_as_whole_words():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import names_any

    subjects = ["San Diego", "Diego Maradona", "Yakutsk"] + [f"Subject {i}" for i in range(1000)]
    assert names_any("Diego Maradona plays for", subjects)
    assert names_any("The zoo of San Diego.", subjects)
    assert names_any("Subject 999 is", subjects) and not names_any("Subject 9999 is", subjects)
    assert not names_any("Irkutsk is in", subjects)
    assert not names_any("San Diegoan food", subjects)  # a longer word is another name
    assert not names_any("x . y", [])  # no subjects: nothing is named


def test_the_lifelong_benchmark_writes_the_unedited_row_beside_the_methods(tmp_path, tiny_llama):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import main, split_facts

    from editing.evaluate import evaluate_accuracy, locality_predictions

    out = tmp_path / "rows.jsonl"
    assert main(["--model", "tiny-llama", "--methods", "grace", "--edits", "2", "--batch", "2", "--held-out", "1",
                 "--unedited", "--out", str(out)]) == 0
    unedited, grace = [json.loads(line) for line in out.read_text().splitlines()]
    facts = split_facts(0, 1)[0][:2]
    expected = evaluate_accuracy(tiny_llama, facts, locality_predictions(tiny_llama, facts))
    assert (unedited["method"], unedited["T"], unedited["s_per_edit"]) == ("unedited", 2, None)
    assert unedited["reliability"] == pytest.approx(expected.reliability)
    assert unedited["generalization"] == pytest.approx(expected.generalization)
    assert unedited["locality"] == 1.0 and unedited["unrelated"] == 1.0
    assert grace["method"] == "grace" and grace["reliability"] > unedited["reliability"]


def test_the_lifelong_benchmark_parses_set_like_the_evaluate_command(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import main

    out = tmp_path / "rows.jsonl"
    for setting, message in [("grace.n_iter=two", "must be a Python literal"), ("grace.n_iter", "expected FIELD=VALUE"),
                             ("memit.layers=(1,)", "among --methods"), ("grace.radius=1.0", "radius")]:
        assert main(["--model", "tiny-llama", "--methods", "grace", "--edits", "2", "--set", setting,
                     "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran


def test_the_lifelong_benchmark_streams_a_zsre_file_and_labels_its_rows(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from lifelong import main

    records = [{"subject": name, "src": f"What is the home town of {name}?", "alt": town, "answers": ["Paris"],
                "rephrase": f"Where does {name} come from?", "loc": "nq question: who wrote hamlet",
                "loc_ans": "Shakespeare"}
               for name, town in (("Alice Smith", "Oslo"), ("Bob Jones", "Lima"), ("Carol White", "Kyiv"))]
    data, out = tmp_path / "tiny_zsre.json", tmp_path / "rows.jsonl"
    data.write_text(json.dumps(records))
    assert main(["--model", "tiny-llama", "--methods", "grace", "--edits", "2", "--batch", "2", "--held-out", "1",
                 "--facts", str(data), "--unedited", "--out", str(out)]) == 0
    unedited, grace = [json.loads(line) for line in out.read_text().splitlines()]
    assert unedited["facts"] == grace["facts"] == "tiny_zsre"
    assert grace["reliability"] > unedited["reliability"] and grace["T"] == 2
    with pytest.raises(SystemExit):  # an unreadable --facts fails before any model is loaded
        main(["--model", "tiny-llama", "--methods", "grace", "--edits", "2", "--facts", str(tmp_path / "none.json"),
              "--out", str(out)])
