"""``python -m editing.evaluate`` end to end on the tiny model: the files it writes, what their headers say,
and its unedited numbers recomputed with the library's own functions."""

import json

import numpy as np

import tracing.models as models
from editing.evaluate import evaluate_accuracy, locality_predictions
from editing.evaluation_command import main
from tracing.facts import Fact
from conftest import weights_digest
from test_generated_answers import hit_by_hand


def test_the_command_writes_a_table_json_and_plot_naming_protocol_and_scoring(tiny_llama, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    weights = weights_digest(tiny_llama)
    code = main(["grace", "--model", "tiny-llama", "--dataset", "known", "-n", "4", "--sequential", "--batch", "2",
                 "--protocol", "after_each", "--scoring", "all", "--set", "n_iter=30", "--set", "edit_lr=0.5",
                 "--out-dir", str(tmp_path)])
    assert code == 0 and weights_digest(tiny_llama) == weights  # the edits are undone
    table = (tmp_path / "evaluate_grace.md").read_text()
    assert table == capsys.readouterr().out.split("wrote ")[0]
    headers = [line for line in table.splitlines() if "scoring:" in line]
    assert headers == [f"| grace · after_each · scoring: {name} | {columns} |" for name, columns in
                       (("probability", "ES | EM | PS | PM | NS | NM | score"), ("token", "Rel | Gen | Loc"),
                        ("generated", "gen-Rel | gen-Gen | gen-Loc"))]
    assert "sequential calls of 2, scored each call right after it" in table
    from editing.scoring import scoring

    # every probability column in percent, the magnitudes EM / PM / NM as well (as `editing.memit` prints them)
    probability = dict(scoring("probability").columns)
    edited_line = table.split("scoring: probability")[1].splitlines()[3]
    cells = [cell.strip() for cell in edited_line.strip("|").split("|")][1:]
    record = json.loads((tmp_path / "evaluate_grace.json").read_text())
    assert (record["protocol"], record["batch"], record["calls"]) == ("after_each", 2, 2)
    assert record["scoring"] == ["probability", "token", "generated"]
    assert [record["edited"][name]["scoring"] for name in record["scoring"]] == record["scoring"]
    assert (tmp_path / "evaluate_grace.png").read_bytes()[:4] == b"\x89PNG"
    assert cells == [f"{100 * record['edited']['probability'][key]:.1f}" for key in probability.values()]
    assert abs(record["edited"]["probability"][probability["EM"]]) > 0.01  # large enough to tell the units apart
    # the unedited row, a second way: the library's token accuracy, and generation by a plain greedy loop
    facts = [Fact.from_counterfact(r) for r in record["facts"]]
    token = evaluate_accuracy(tiny_llama, facts, locality_predictions(tiny_llama, facts))
    assert record["unedited"]["token"]["reliability"] == token.reliability
    assert record["unedited"]["token"]["locality"] == 1.0 == record["unedited"]["generated"]["locality"]
    assert record["unedited"]["generated"]["reliability"] == np.mean(
        [hit_by_hand(tiny_llama, f.prompt, f.target_new) for f in facts])
    assert record["edited"]["token"]["reliability"] == 1.0 > token.reliability  # GRACE answers its prompts


def test_one_call_is_the_default_protocol(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    assert main(["grace", "--model", "tiny-llama", "-n", "2", "--scoring", "token", "--set", "n_iter=30",
                 "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "evaluate_grace.json").read_text())
    assert (record["protocol"], record["batch"], record["calls"], list(record["edited"])) == ("one_call", 2, 1, ["token"])
    assert "| grace · one call · scoring: token | Rel | Gen | Loc |" in (tmp_path / "evaluate_grace.md").read_text()
