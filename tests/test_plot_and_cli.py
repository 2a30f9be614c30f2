import numpy as np
import pytest
from PIL import Image

from tracing import heatmap
from tracing.average import average_indirect_effect, choose_critical_layers
from tracing.causal_trace import FactTrace
from tracing.plot import plot_average_effect, plot_critical_layers, plot_trace, save_figure, token_labels


def _trace(kinds=("resid", "mlp", "attn")):
    rng = np.random.default_rng(0)
    return FactTrace(
        prompt="The Eiffel Tower is in", subject="Eiffel Tower", tokens=["The", " E", "iffel", " Tower", " is", " in"],
        token_ids=list(range(6)), subject_range=(1, 4), answer=" Paris", answer_id=9, clean_top=" Paris",
        clean_prob=0.7, corrupted_prob=0.02, noise=1.0, samples=3, window=10, seed=1, model_name="synthetic",
        scores={k: rng.uniform(0.02, 0.7, size=(6, 12)) for k in kinds},
    )


def test_labels_star_the_subject():
    assert token_labels(["The", " E", "iffel", "\n"], (1, 3)) == ["The", "E*", "iffel*", "\\n"]


def test_trace_figure_has_one_panel_per_kind(tmp_path):
    fig = plot_trace(_trace())
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 3
    assert [ax.get_title() for ax in heatmaps][1] == "Restoring MLP output"
    assert heatmaps[0].get_yticklabels()[1].get_text() == "E*"
    out = save_figure(fig, tmp_path / "trace.png")
    width, height = Image.open(out).size
    assert width > 2 * height > 200  # three panels side by side


def test_average_and_layer_figures(tmp_path):
    effect = average_indirect_effect([_trace(("mlp",))], "mlp")
    critical = choose_critical_layers(effect, size=3, method="max-sum")
    for fig, name in [(plot_average_effect([effect]), "avg.png"), (plot_critical_layers(critical), "layers.png")]:
        out = save_figure(fig, tmp_path / name)
        assert Image.open(out).size[0] > 300


def test_cli_draws_a_heatmap_for_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "tiny.png"
    saved = tmp_path / "tiny.npz"
    code = heatmap.main(["tiny-gpt2", "--kind", "mlp", "--samples", "2", "--out", str(out),
                         "--save-trace", str(saved), "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower"])
    assert code == 0
    assert Image.open(out).size[0] > 200
    trace = FactTrace.load(saved)
    assert trace.kinds == ("mlp",) and trace.model_name == "tiny-gpt2"
    assert "strongest restore" in capsys.readouterr().out


def test_cli_traces_a_multi_token_answer_only_when_asked(tmp_path, capsys):
    argv = ["tiny-gpt2", "--kind", "mlp", "--samples", "1", "--answer", "zzqxj", "--out", str(tmp_path / "z.png")]
    with pytest.raises(SystemExit):
        heatmap.main(argv)
    assert "[' z', 'z', 'q', 'x', 'j']" in capsys.readouterr().err and not (tmp_path / "z.png").exists()
    assert heatmap.main([*argv, "--allow-multi-token-answer"]) == 0
    assert "answer       'z'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["tiny-llama", "--prompt", "The capital of Germany is", "--subject", "France"], "does not occur"),
    (["tiny-llama", "--prompt", "The capital of Germany is"], "needs --subject"),
    (["no-such-model"], "Unknown model name"),
])
def test_cli_errors_are_one_clear_line(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        heatmap.main([*argv, "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1


def test_cli_offline_hub_model(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit:
        heatmap.main(["gpt-j", "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    assert "EleutherAI/gpt-j-6B" in capsys.readouterr().err
