"""Attribution patching, symmetric token replacement, the logit difference and noising, on tiny random models."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tracing.atp_accuracy import atp_accuracy, pearson, top_k_agreement
from tracing.causal_trace import FactTrace, TraceConfig, trace_fact, trace_prompt
from tracing.corruption import NoReplacementError, replacement_subjects
from tracing.engine import restored_layers
from tracing.facts import known_facts, spread
from tracing.models import load_model
from tracing.tokens import encode_with_offsets, subject_token_range

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"
QUIET = TraceConfig(samples=3, noise=1.0, show_progress=False)
ROOT = Path(__file__).parents[1]


def _effects(trace):
    return {kind: trace.indirect_effect(kind)[trace.subject_range[0]:] for kind in trace.kinds}


def test_atp_is_the_exact_effect_in_the_linear_limit():
    """With window 1 every AtP cell is the first-order term of exact restoration: as the corruption shrinks,
    the relative error shrinks in proportion (float64, so rounding does not hide it)."""
    model = load_model("tiny-llama", device="cpu", dtype=torch.float64)
    errors = []
    for eps in (1e-3, 1e-4):
        config = TraceConfig(samples=2, noise=eps, window=1, metric="logit_diff", show_progress=False, verify=False)
        exact = _effects(trace_prompt(model, PROMPT, SUBJECT, counterfactual="Rome", config=config))
        atp = _effects(trace_prompt(model, PROMPT, SUBJECT, counterfactual="Rome",
                                    config=dataclasses.replace(config, method="atp")))
        errors.append(max(np.abs(atp[k] - exact[k]).max() / np.abs(exact[k]).max() for k in exact))
    assert errors[1] < 5e-3
    assert errors[0] / errors[1] > 5  # first order: the relative error is proportional to the corruption


def test_atp_window_is_the_sum_of_the_single_layer_terms(tiny_llama):
    """Linear in the metric, a window's estimate is the sum of its layers' single-layer estimates."""
    linear = dataclasses.replace(QUIET, method="atp", atp_space="metric")
    single = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(linear, window=1))
    window = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(linear, window=3))
    for kind in ("mlp", "attn"):
        terms = single.indirect_effect(kind)
        expected = np.stack([terms[:, list(restored_layers(kind, l, 4, 3))].sum(axis=1) for l in range(4)], axis=1)
        np.testing.assert_allclose(window.indirect_effect(kind), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(window.scores["resid"], single.scores["resid"])


def test_atp_trace_records_its_method_and_round_trips(tiny_llama, tmp_path):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, method="atp"))
    assert trace.method == "atp" and trace.engine == "atp" and trace.corruption == "gaussian"
    for kind in trace.kinds:  # tokens before the subject are the same in both runs: no effect at all
        assert np.all(trace.indirect_effect(kind)[: trace.subject_range[0]] == 0)
    exact = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET)
    assert trace.clean_prob == pytest.approx(exact.clean_prob, rel=1e-5)
    assert trace.corrupted_prob == pytest.approx(exact.corrupted_prob, rel=1e-4)
    trace.save(tmp_path / "atp.npz")
    loaded = FactTrace.load(tmp_path / "atp.npz")
    assert (loaded.method, loaded.metric, loaded.direction) == ("atp", "prob", "denoising")


@pytest.mark.parametrize("choice", [{}, {"corruption": "symmetric"}, {"direction": "noising"},
                                    {"metric": "logit_diff"}, {"tokens": "last subject", "window": 1}])
def test_many_facts_in_one_scan_batch_give_each_fact_its_own_trace(tiny_llama, choice):
    """Facts of different lengths right-padded into one forward/backward: every number is the one the fact
    gets alone (padding after a prompt is never seen by it), for every corruption, direction and metric."""
    from tracing.average import trace_facts
    from tracing.causal_trace import trace_facts_scanned

    facts = [f for f in spread(known_facts(), 40) if f.target_new is not None][:5]
    assert len({len(encode_with_offsets(tiny_llama, f.prompt).ids) for f in facts}) > 1  # padding is exercised
    config = dataclasses.replace(QUIET, method="atp", **choice)
    alone = [trace_fact(tiny_llama, fact, config=config) for fact in facts]
    batched = trace_facts_scanned(tiny_llama, facts, dataclasses.replace(config, fact_batch=3))
    assert trace_facts(tiny_llama, facts, dataclasses.replace(config, fact_batch=4))[4].prompt == facts[4].prompt
    for one, many in zip(alone, batched):
        assert (many.prompt, many.answer, many.clean_top, many.samples) == (one.prompt, one.answer, one.clean_top, one.samples)
        assert many.clean_prob == pytest.approx(one.clean_prob, rel=1e-5, abs=1e-6)
        assert many.corrupted_prob == pytest.approx(one.corrupted_prob, rel=1e-5, abs=1e-6)
        for kind in one.kinds:
            np.testing.assert_allclose(many.scores[kind], one.scores[kind], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fact_batch must be >= 1"):
        TraceConfig(fact_batch=0)
    with pytest.raises(ValueError, match="only the atp scan"):
        trace_facts_scanned(tiny_llama, facts, QUIET)


@pytest.mark.parametrize("space", ["log_odds", "metric"])
def test_atp_correlates_with_exact_tracing(tiny_llama, space):
    """Per fact, in either space. Pooled over facts only linear in the metric: on this random model the
    log-odds estimates of different facts land on different scales (pooled r 0.36, per fact 0.97); on the
    embedded model log-odds raises the pooled r too (docs/atp.md)."""
    config = TraceConfig(samples=3, show_progress=False, atp_space=space)
    result = atp_accuracy(tiny_llama, spread(known_facts(), 3), config)
    mlp = result.kinds["mlp"]
    assert mlp.n_facts == 3 and mlp.pearson > 0.9 and mlp.top_k >= 0.6
    assert space == "log_odds" or mlp.pearson_pooled > 0.85
    assert set(result.kinds) == {"resid", "mlp", "attn"} and result.atp_seconds < result.exact_seconds
    record = result.as_record()
    assert record["kinds"]["resid"]["k"] == 10 and "method" not in record["config"]


def test_agreement_measures():
    assert pearson(np.array([1, 2, 3]), np.array([2, 4, 6.5])) > 0.99
    assert np.isnan(pearson(np.ones(3), np.arange(3)))
    assert top_k_agreement(np.array([5, 4, 0, 0]), np.array([9, 0, 8, 0]), 2) == 0.5


def test_symmetric_replacement_swaps_exactly_the_subject_tokens(tiny_llama):
    encoded = encode_with_offsets(tiny_llama, PROMPT)
    start, end = subject_token_range(encoded, SUBJECT)
    found = replacement_subjects(tiny_llama, encoded, SUBJECT, PROMPT.find(SUBJECT), (start, end), 3, seed=1)
    assert len(found) == 3 and SUBJECT not in [name for name, _ in found]
    for name, ids in found:
        replaced = encode_with_offsets(tiny_llama, PROMPT.replace(SUBJECT, name)).ids
        assert replaced[:start] == encoded.ids[:start] and replaced[end:] == encoded.ids[end:]
        assert list(replaced[start:end]) == ids != list(encoded.ids[start:end])
    # the corrupted run of a one-subject trace is the model on the replaced prompt
    config = dataclasses.replace(QUIET, corruption="symmetric", samples=1)
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=config)
    assert trace.samples == 1 and trace.noise == 0 and trace.replacements == (found[0][0],)
    with torch.no_grad():
        logits = tiny_llama(encode_with_offsets(tiny_llama, PROMPT.replace(SUBJECT, found[0][0])).tensor())
    assert trace.corrupted_prob == pytest.approx(float(torch.softmax(logits[0, -1], -1)[trace.answer_id]), rel=1e-4)
    # and restoring the last state brings the clean run back, as with noise
    assert trace.scores["resid"][-1, -1] == pytest.approx(trace.clean_prob, rel=1e-5)


def test_symmetric_replacement_without_a_subject_of_equal_length_refuses_before_any_forward(tiny_llama):
    calls = []
    handle = tiny_llama.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(NoReplacementError, match="corruption 'symmetric'.*'Xqzt Vbnm Plkj Wert Zzyx'"):
            trace_prompt(tiny_llama, "Xqzt Vbnm Plkj Wert Zzyx is in", "Xqzt Vbnm Plkj Wert Zzyx",
                         config=dataclasses.replace(QUIET, corruption="symmetric"))
        with pytest.raises(ValueError, match="counterfactual answer ' Paris' is the traced answer 'Paris'"):
            trace_prompt(tiny_llama, PROMPT, SUBJECT, answer="Paris", counterfactual=" Paris",
                         config=dataclasses.replace(QUIET, metric="logit_diff"))
    finally:
        handle.remove()
    assert calls == []


def test_logit_difference_is_logit_answer_minus_logit_counterfactual(tiny_llama):
    config = dataclasses.replace(QUIET, metric="logit_diff")
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, answer="Paris", counterfactual="Rome", config=config)
    paris, rome = (tiny_llama.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("Paris", "Rome"))
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([trace.token_ids]))[0, -1]
    assert trace.clean_prob == pytest.approx(float(logits[paris] - logits[rome]), rel=1e-5)
    assert trace.metric == "logit_diff" and trace.counterfactual == "Rome"
    # restoring the last state gives the clean value back; exact and fast engines agree on the new metric
    assert trace.scores["resid"][-1, -1] == pytest.approx(trace.clean_prob, rel=1e-5)
    reference = trace_prompt(tiny_llama, PROMPT, SUBJECT, answer="Paris", counterfactual="Rome",
                             config=dataclasses.replace(config, engine="reference"))
    np.testing.assert_allclose(trace.scores["mlp"], reference.scores["mlp"], rtol=1e-4, atol=1e-5)


def test_trace_fact_compares_against_target_new(tiny_llama):
    fact = known_facts(1)[0]
    trace = trace_fact(tiny_llama, fact, config=dataclasses.replace(QUIET, metric="logit_diff", kinds=("mlp",)))
    assert trace.counterfactual == fact.target_new


def test_noising_corrupts_one_state_of_the_clean_run(tiny_llama):
    trace = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, direction="noising"))
    assert trace.engine == "reference" and trace.direction == "noising"
    start = trace.subject_range[0]
    for kind in trace.kinds:  # before the subject the corrupted run equals the clean one
        np.testing.assert_allclose(trace.scores[kind][:start], trace.clean_prob, rtol=1e-5)
    # corrupting the whole final state is the corrupted run
    assert trace.scores["resid"][-1, -1] == pytest.approx(trace.corrupted_prob, rel=1e-5)
    assert trace.indirect_effect("resid")[-1, -1] == pytest.approx(trace.clean_prob - trace.corrupted_prob, rel=1e-5)
    atp = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, direction="noising", method="atp"))
    assert atp.direction == "noising" and np.all(atp.indirect_effect("mlp")[:start] == 0)


def test_heatmap_cli_draws_an_atp_heatmap_and_names_the_choices(tmp_path, capsys):
    from tracing import heatmap

    out = tmp_path / "atp.png"
    saved = tmp_path / "atp.npz"
    code = heatmap.main(["tiny-gpt2", "--method", "atp", "--corruption", "symmetric", "--metric", "logit_diff",
                         "--answer", "Paris", "--counterfactual", "Rome", "--samples", "2", "--out", str(out),
                         "--save-trace", str(saved)])
    assert code == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "attribution patching" in printed and "logit(Paris) − logit(Rome)" in printed
    trace = FactTrace.load(saved)
    assert (trace.method, trace.corruption, trace.metric) == ("atp", "symmetric", "logit_diff")
    from tracing.plot import plot_trace

    fig = plot_trace(trace)
    assert "symmetric replacement" in fig._suptitle.get_text() and "attribution patching" in fig._suptitle.get_text()
    assert "(AtP)" in [ax for ax in fig.axes if ax.images][0].get_title()


def test_locate_cli_with_atp_as_first_pass(tiny_llama, tmp_path, monkeypatch, capsys):
    import tracing.models as models
    from tracing import locate

    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache"))  # the layer choice is cached: not in ours
    monkeypatch.setattr(models, "load_model", lambda name, **kwargs: tiny_llama)
    assert locate.main(["tiny-llama", "--facts", "3", "--trace-method", "atp", "--samples", "2",
                        "--include-wrong"]) == 0
    assert "traced by attribution patching (linear in log-odds)" in capsys.readouterr().out
    assert (tmp_path / "cache" / "critical_layers" / "tiny-llama.json").is_file()


def test_atp_accuracy_benchmark_on_a_tiny_model(tmp_path):
    out = tmp_path / "atp_accuracy.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "atp_accuracy.py"), "--model", "tiny-llama",
                             "--facts", "3", "--samples", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["n_facts"] == 3 and set(record["kinds"]) == {"resid", "mlp", "attn"}
    assert "pearson" in result.stdout


def test_atp_steps_average_the_gradient_over_noise_scales(tiny_llama):
    """``atp_steps=k``: the gradient at noise scales 1, 1 - 1/k, ... averaged, times the full clean - corrupted
    difference; recomputed here with plain hooks for one MLP layer. Noising with steps is refused."""
    from tracing.adapter import ModelAdapter
    from tracing.attribution import attribution_patching
    from tracing.engine import TraceInputs

    torch.manual_seed(0)
    encoded = encode_with_offsets(tiny_llama, PROMPT)
    tokens, subject = torch.tensor([encoded.ids]), subject_token_range(encoded, SUBJECT)
    noise = torch.randn(3, subject[1] - subject[0], tiny_llama.cfg.d_model)
    with torch.no_grad():
        answer = int(tiny_llama(tokens)[0, -1].argmax())
    inputs = TraceInputs(tokens, subject, answer, noise)
    adapter, layer, steps = ModelAdapter.of(tiny_llama), 1, 3
    name = adapter.state_hook("mlp", layer)

    def run(scale: float):
        kept = {}

        def corrupt(embeddings, hook):
            embeddings = embeddings.repeat(3, 1, 1).detach().clone()
            embeddings[:, subject[0]: subject[1]] += scale * noise
            return embeddings.requires_grad_(True)

        def keep(state, hook):
            kept["a"] = state
            return state

        logits = tiny_llama.run_with_hooks(tokens, fwd_hooks=[(adapter.embed, corrupt), (name, keep)])
        metric = torch.softmax(logits[:, -1].float(), -1)[:, answer].sum()
        return kept["a"], torch.autograd.grad(metric, kept["a"])[0]

    with torch.no_grad():
        clean = tiny_llama.run_with_cache(tokens, names_filter=lambda n: n == name)[1][name]
    corrupted, _ = run(1.0)
    gradient = sum(run(1.0 - j / steps)[1] for j in range(steps)) / steps
    expected = ((clean - corrupted.detach()) * gradient).sum(-1).mean(0)

    output = attribution_patching(tiny_llama, inputs, ["mlp"], window=1, steps=steps, space="metric")
    estimated = output.scores["mlp"][:, layer] - output.corrupted_prob
    np.testing.assert_allclose(estimated, expected.double().numpy(), rtol=1e-4, atol=1e-7)
    plain = attribution_patching(tiny_llama, inputs, ["mlp"], window=1, space="metric").scores["mlp"][:, layer]
    assert np.abs(plain - output.scores["mlp"][:, layer]).max() > 1e-6  # the extra steps change the estimate
    with pytest.raises(ValueError, match="denoising"):
        TraceConfig(method="atp", direction="noising", atp_steps=2)
    with pytest.raises(ValueError, match=">= 1"):
        TraceConfig(atp_steps=0)


@pytest.mark.parametrize("extra, message", [([], "needs --method atp"),
                                             (["--method", "atp", "--direction", "noising"], "denoising"),
                                             (["--method", "atp", "--atp-steps", "0"], ">= 1")])
def test_heatmap_cli_refuses_atp_steps_it_cannot_use_before_loading(extra, message, capsys):
    from tracing import heatmap

    arguments = ["no-such-model", "--atp-steps", "2", *extra]  # a model that would fail later, if it were read
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_atp_in_log_odds_is_recomputed_by_hand_and_read_back_as_a_probability(tiny_llama, direction):
    """``atp_space="log_odds"`` (the default): per row, the answer's log-odds log(p / (1 - p)) plus the
    first-order terms of the log-odds summed over the window, read back through the sigmoid and averaged
    over rows; recomputed here with plain hooks and a softmax for two MLP layers (window 2)."""
    from tracing.adapter import ModelAdapter
    from tracing.attribution import attribution_patching
    from tracing.engine import TraceInputs

    torch.manual_seed(0)
    encoded = encode_with_offsets(tiny_llama, PROMPT)
    tokens, subject = torch.tensor([encoded.ids]), subject_token_range(encoded, SUBJECT)
    noise = 3 * torch.randn(3, subject[1] - subject[0], tiny_llama.cfg.d_model)
    with torch.no_grad():
        answer = int(tiny_llama(tokens)[0, -1].argmax())
    inputs = TraceInputs(tokens, subject, answer, noise)
    adapter = ModelAdapter.of(tiny_llama)
    names = [adapter.state_hook("mlp", layer) for layer in (0, 1)]

    def run(corrupted: bool):
        kept = {}

        def start(embeddings, hook):
            embeddings = embeddings.repeat(3 if corrupted else 1, 1, 1).detach().clone()
            if corrupted:
                embeddings[:, subject[0]: subject[1]] += noise
            return embeddings.requires_grad_(True)

        def keep(state, hook):
            kept[hook.name] = state
            return state

        logits = tiny_llama.run_with_hooks(tokens, fwd_hooks=[(adapter.embed, start)] + [(n, keep) for n in names])
        p = torch.softmax(logits[:, -1].double(), -1)[:, answer]
        log_odds = torch.log(p) - torch.log1p(-p)
        return log_odds, [kept[n] for n in names]

    clean_z, clean = run(False)
    corrupt_z, corrupt = run(True)
    base_z, base, source = (corrupt_z, corrupt, clean) if direction == "denoising" else (clean_z, clean, corrupt)
    gradients = torch.autograd.grad(base_z.sum(), base)
    term = sum(((s.detach() - b.detach()) * g).sum(-1) for s, b, g in zip(source, base, gradients))  # (rows, T)
    expected = torch.sigmoid(base_z.detach()[:, None] + term.double()).mean(0)

    output = attribution_patching(tiny_llama, inputs, ["mlp"], window=2, direction=direction)
    assert output.scores["mlp"].shape == (len(encoded.ids), tiny_llama.cfg.n_layers)
    # window 2 at layer 1 restores layers 0 and 1 (restored_layers: l - 1 .. l)
    assert list(restored_layers("mlp", 1, tiny_llama.cfg.n_layers, 2)) == [0, 1]
    np.testing.assert_allclose(output.scores["mlp"][:, 1], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert output.scores["mlp"].min() >= 0 and output.scores["mlp"].max() <= 1  # a probability, always
    linear = attribution_patching(tiny_llama, inputs, ["mlp"], window=2, direction=direction, space="metric")
    assert np.abs(linear.scores["mlp"] - output.scores["mlp"]).max() > 1e-6  # the space changes the estimate


def test_atp_space_is_a_choice_of_the_probability_metric_only_and_refused_when_unknown(tiny_llama, capsys):
    """Under ``logit_diff`` the metric is already linear in the logits: both spaces give the same numbers.
    An unknown space is refused when the config is made, and by the command before any model is read."""
    from tracing import heatmap

    config = TraceConfig(samples=2, method="atp", metric="logit_diff", show_progress=False)
    traces = [trace_prompt(tiny_llama, PROMPT, SUBJECT, counterfactual="Rome",
                           config=dataclasses.replace(config, atp_space=space)) for space in ("log_odds", "metric")]
    for kind in traces[0].kinds:
        np.testing.assert_array_equal(traces[0].scores[kind], traces[1].scores[kind])
    assert traces[0].atp_space == "log_odds" and trace_prompt(tiny_llama, PROMPT, SUBJECT, config=QUIET).atp_space is None
    from tracing.plot import describe_trace

    probability = trace_prompt(tiny_llama, PROMPT, SUBJECT, config=dataclasses.replace(QUIET, method="atp"))
    assert "attribution patching (linear in log-odds)" in describe_trace(probability)  # the title says how
    assert "attribution patching (linear in the metric)" in describe_trace(traces[0])  # logit_diff: no read-back
    with pytest.raises(ValueError, match="unknown atp space 'odds'"):
        TraceConfig(method="atp", atp_space="odds")
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(["no-such-model", "--atp-space", "metric"])  # refused before the model would fail
    assert exit_info.value.code == 2 and "--atp-space metric needs --method atp" in capsys.readouterr().err
