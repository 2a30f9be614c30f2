"""Bad input, table-driven: every command line and API entry point refuses it with a clear message and
changes nothing.

For each command-line case: exit status 2, one line ``error: ...`` on stderr naming the problem, no
traceback, no model loaded unless the check needs the model (then the tiny model, handed in for the
real loader), its weights and every file (the working folder, the inputs, the suite's cache) unchanged.
For each API case: the exception and a message naming the problem, weights and files unchanged. Tiny
models only: the module runs in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tracing.models as models
from editing.memit import MemitConfig, apply_memit
from editing.requests import EditRequestError, validate_requests
from tracing.causal_trace import FactTrace, TraceConfig, trace_fact, trace_prompt
from tracing.facts import Fact, fact_from_prompt, load_facts
from tracing.models import UnknownModelError, load_model
from tracing.tokens import SubjectNotFoundError
from conftest import weights_digest

PROMPT = "The Eiffel Tower is in"

GERMANY = Fact("Germany", "The capital of {} is", "Berlin", "Madrid", relation="P36")
SAME_TARGET = dataclasses.replace(GERMANY, target_new=" Berlin ")  # equal to target_true once stripped


INPUTS = {  # written into the test's folder before each case; {tmp} in an argument is that folder
    "notamodel/README.txt": "not a model",
    "noweights/config.json": json.dumps({"model_type": "llama"}),
    "afile.txt": "just text",
    "bad.json": "{not json",
    "empty.json": "[]",
    "other.json": json.dumps([{"question": "?"}]),
    "same_target.json": json.dumps([SAME_TARGET.to_counterfact()]),
    "no_target_new.json": json.dumps([dataclasses.replace(GERMANY, target_new=None).to_counterfact()]),
    "results.json": json.dumps({"not": "a list"}),
    "no_subject.json": json.dumps([{"requested_rewrite": {"prompt": "{} is in", "target_true": {"str": "Paris"}}}]),
    "trace.npz": "not an npz archive",
}

# (id, module whose main() is called, arguments, text the error line must contain, loads the model)
CLI_CASES = [
    # tracing.heatmap: numbers, formats, strings, the subject, the model, the answer
    ("heatmap-samples-0", "tracing.heatmap", ["tiny-llama", "--samples", "0"], "--samples: must be >= 1", False),
    ("heatmap-samples-word", "tracing.heatmap", ["tiny-llama", "--samples", "ten"], "expected an integer", False),
    ("heatmap-noise-negative", "tracing.heatmap", ["tiny-llama", "--noise", "-1"], "--noise: must be >= 0", False),
    ("heatmap-noise-nan", "tracing.heatmap", ["tiny-llama", "--noise", "nan"], "finite", False),
    ("heatmap-window-0", "tracing.heatmap", ["tiny-llama", "--window", "0"], "--window: must be >= 1", False),
    ("heatmap-seed-negative", "tracing.heatmap", ["tiny-llama", "--seed", "-3"], "--seed: must be >= 0", False),
    ("heatmap-out-xyz", "tracing.heatmap", ["tiny-llama", "--out", "{tmp}/x.xyz"], "the format '.xyz' is not one matplotlib saves", False),
    ("heatmap-out-no-extension", "tracing.heatmap", ["tiny-llama", "--out", "{tmp}/x"], "it has no extension", False),
    ("heatmap-out-folder", "tracing.heatmap", ["tiny-llama", "--out", "{tmp}/notamodel"], "is a folder", False),
    ("heatmap-out-under-a-file", "tracing.heatmap", ["tiny-llama", "--out", "{tmp}/afile.txt/x.png"],
     "is a file", False),
    ("heatmap-save-trace-not-npz", "tracing.heatmap", ["tiny-llama", "--save-trace", "{tmp}/t.json"],
     "must end in .npz", False),
    ("heatmap-empty-prompt", "tracing.heatmap", ["tiny-llama", "--prompt", "", "--subject", "Eiffel"],
     "--prompt: must not be empty", False),
    ("heatmap-empty-subject", "tracing.heatmap", ["tiny-llama", "--prompt", PROMPT, "--subject", ""],
     "--subject: must not be empty", False),
    ("heatmap-blank-subject", "tracing.heatmap", ["tiny-llama", "--subject", "   "],
     "--subject: must not be empty", False),
    ("heatmap-empty-answer", "tracing.heatmap", ["tiny-llama", "--answer", ""], "--answer: must not be empty", False),
    ("heatmap-prompt-without-subject", "tracing.heatmap", ["tiny-llama", "--prompt", PROMPT], "needs --subject", False),
    ("heatmap-subject-not-in-prompt", "tracing.heatmap", ["tiny-llama", "--prompt", PROMPT, "--subject", "Louvre"],
     "subject 'Louvre' does not occur in prompt", False),
    ("heatmap-subject-not-in-default-prompt", "tracing.heatmap", ["tiny-llama", "--subject", "Louvre"],
     "does not occur in prompt 'The Eiffel Tower", False),
    ("heatmap-kind", "tracing.heatmap", ["tiny-llama", "--kind", "everything"], "invalid choice", False),
    ("heatmap-engine", "tracing.heatmap", ["tiny-llama", "--engine", "slow"], "invalid choice", False),
    ("heatmap-unknown-option", "tracing.heatmap", ["tiny-llama", "--colour", "red"], "unrecognized arguments", False),
    ("heatmap-device", "tracing.heatmap", ["tiny-llama", "--device", "toaster"], "is not a device", False),
    ("heatmap-empty-model", "tracing.heatmap", [""], "must not be empty", False),
    ("heatmap-unknown-model", "tracing.heatmap", ["no-such-model"], "Unknown model name 'no-such-model'", False),
    ("heatmap-missing-folder", "tracing.heatmap", ["{tmp}/no/such/model"], "does not exist", False),
    ("heatmap-folder-not-a-model", "tracing.heatmap", ["{tmp}/notamodel"], "no config.json", False),
    ("heatmap-file-not-a-model", "tracing.heatmap", ["{tmp}/afile.txt"], "is a file, not a model folder", False),
    ("heatmap-multi-token-answer", "tracing.heatmap", ["tiny-llama", "--answer", "zzqxj"],
     "--allow-multi-token-answer", True),
    # tracing.heatmap: how the trace is made
    ("heatmap-method", "tracing.heatmap", ["tiny-llama", "--method", "gradient"], "argument --method: invalid choice",
     False),
    ("heatmap-corruption", "tracing.heatmap", ["tiny-llama", "--corruption", "blur"],
     "argument --corruption: invalid choice", False),
    ("heatmap-metric", "tracing.heatmap", ["tiny-llama", "--metric", "rank"], "argument --metric: invalid choice",
     False),
    ("heatmap-direction", "tracing.heatmap", ["tiny-llama", "--direction", "sideways"],
     "argument --direction: invalid choice", False),
    ("heatmap-logit-diff-without-counterfactual", "tracing.heatmap", ["tiny-llama", "--metric", "logit_diff"],
     "--metric logit_diff needs --counterfactual", False),
    ("heatmap-counterfactual-without-logit-diff", "tracing.heatmap", ["tiny-llama", "--counterfactual", "Rome"],
     "--counterfactual is only used with --metric logit_diff", False),
    ("heatmap-counterfactual-is-answer", "tracing.heatmap",
     ["tiny-llama", "--metric", "logit_diff", "--answer", "Paris", "--counterfactual", " Paris"],
     "--counterfactual ' Paris' is the traced --answer", False),
    ("heatmap-noise-with-symmetric", "tracing.heatmap", ["tiny-llama", "--corruption", "symmetric", "--noise", "1"],
     "--noise sets the Gaussian noise; it has no meaning with --corruption symmetric", False),
    ("heatmap-counterfactual-same-token", "tracing.heatmap",
     ["tiny-llama", "--metric", "logit_diff", "--answer", "Paris", "--counterfactual", "Paris Hilton",
      "--allow-multi-token-answer"], "starts with the same token", True),
    ("heatmap-symmetric-no-subject", "tracing.heatmap",
     ["tiny-llama", "--corruption", "symmetric", "--prompt", "Xqzt Vbnm Plkj Wert Zzyx is in", "--subject",
      "Xqzt Vbnm Plkj Wert Zzyx"], "corruption 'symmetric': no subject of the bundled known facts takes the same", True),
    # tracing.locate
    ("locate-facts-0", "tracing.locate", ["tiny-llama", "--facts", "0"], "--facts: must be >= 1", False),
    ("locate-samples-0", "tracing.locate", ["tiny-llama", "--samples", "0"], "--samples: must be >= 1", False),
    ("locate-size-0", "tracing.locate", ["tiny-llama", "--size", "0"], "--size: must be >= 1", False),
    ("locate-kinds", "tracing.locate", ["tiny-llama", "--kinds", "mlp,neurons"], "expected comma-separated kinds",
     False),
    ("locate-method", "tracing.locate", ["tiny-llama", "--method", "best"], "invalid choice", False),
    ("locate-facts-file-missing", "tracing.locate", ["tiny-llama", "--facts-file", "{tmp}/nope.json"],
     "does not exist", False),
    ("locate-facts-file-folder", "tracing.locate", ["tiny-llama", "--facts-file", "{tmp}/notamodel"],
     "is a folder, not a file", False),
    ("locate-facts-file-not-json", "tracing.locate", ["tiny-llama", "--facts-file", "{tmp}/bad.json"],
     "cannot read facts", False),
    ("locate-facts-file-empty", "tracing.locate", ["tiny-llama", "--facts-file", "{tmp}/empty.json"],
     "holds no facts", False),
    ("locate-facts-file-other-format", "tracing.locate", ["tiny-llama", "--facts-file", "{tmp}/other.json"],
     "neither CounterFact", False),
    ("locate-figures-is-a-file", "tracing.locate", ["tiny-llama", "--figures", "{tmp}/afile.txt"],
     "is a file, not a folder", False),
    ("locate-missing-model-folder", "tracing.locate", ["./no-such-folder/model"], "does not exist", False),
    ("locate-size-above-layers", "tracing.locate", ["tiny-llama", "--size", "9"], "has 4 layers", True),
    ("locate-trace-method", "tracing.locate", ["tiny-llama", "--trace-method", "fast"],
     "argument --trace-method: invalid choice", False),
    ("locate-corruption", "tracing.locate", ["tiny-llama", "--corruption", "blur"], "invalid choice", False),
    ("locate-metric", "tracing.locate", ["tiny-llama", "--metric", "rank"], "invalid choice", False),
    ("locate-logit-diff-without-target-new", "tracing.locate",
     ["tiny-llama", "--metric", "logit_diff", "--facts-file", "{tmp}/no_target_new.json"],
     "--metric logit_diff compares against each fact's target_new, and 1 fact(s) have none (first: 'Germany')", False),
    # editing.memit
    ("memit-n-0", "editing.memit", ["tiny-llama", "-n", "0"], "--n-edits: must be >= 1", False),
    ("memit-layers-words", "editing.memit", ["tiny-llama", "--layers", "one,two"], "comma-separated layer numbers",
     False),
    ("memit-layers-negative", "editing.memit", ["tiny-llama", "--layers", "-1"], "comma-separated layer numbers",
     False),
    ("memit-mom2-weight-0", "editing.memit", ["tiny-llama", "--mom2-weight", "0"], "--mom2-weight: must be > 0", False),
    ("memit-corpus-samples-0", "editing.memit", ["tiny-llama", "--corpus-samples", "0"], "must be >= 1", False),
    ("memit-generation-cases", "editing.memit", ["tiny-llama", "--generation-cases", "-1"], "must be >= 0", False),
    ("memit-corpus-missing", "editing.memit", ["tiny-llama", "--corpus", "{tmp}/corpus.txt"],
     "no such file or folder exists", False),
    ("memit-corpus-hf-empty", "editing.memit", ["tiny-llama", "--corpus", "hf:"], "needs a dataset name", False),
    ("memit-save-edit-suffix", "editing.memit", ["tiny-llama", "--save-edit", "{tmp}/edit.pt"],
     "must end in .safetensors", False),
    ("memit-out-dir-is-a-file", "editing.memit", ["tiny-llama", "--out-dir", "{tmp}/afile.txt"],
     "is a file, not a folder", False),
    ("memit-facts-missing", "editing.memit", ["tiny-llama", "--facts", "{tmp}/nope.json"], "does not exist", False),
    ("memit-facts-not-a-dataset-name", "editing.memit", ["tiny-llama", "--facts", "counterfactual"],
     "is no dataset name (known: counterfact,", False),
    ("memit-facts-record-without-subject", "editing.memit", ["tiny-llama", "--facts", "{tmp}/no_subject.json"],
     "record 0: missing field 'requested_rewrite.subject'", False),
    ("memit-folder-not-a-model", "editing.memit", ["{tmp}/notamodel"], "no config.json", False),
    ("memit-no-known-layers", "editing.memit", ["tiny-llama", "-n", "2"], "no critical layers known", True),
    ("memit-layers-out-of-range", "editing.memit", ["tiny-llama", "--layers", "9"], "out of range", True),
    ("memit-target-new-is-true", "editing.memit", ["tiny-llama", "--layers", "1,2", "--facts", "{tmp}/same_target.json"],
     "request 0 ('Germany'): target_new ' Berlin ' is the true target 'Berlin'", True),
    ("memit-corpus-tokens-0", "editing.memit", ["tiny-llama", "--corpus-tokens", "0"], "must be >= 1", False),
    ("memit-key-stats-missing", "editing.memit", ["tiny-llama", "--key-stats", "{tmp}/c0.safetensors"],
     "does not exist", False),
    ("memit-key-stats-not-stats", "editing.memit", ["tiny-llama", "--layers", "1", "--key-stats", "{tmp}/afile.txt"],
     "is not a key-statistics file", True),
    # editing.compare_bands
    ("bands-unknown-band", "editing.compare_bands", ["tiny-llama", "--bands", "first,top"],
     "expected comma-separated bands from critical, first, mid, random", False),
    ("bands-empty-band-list", "editing.compare_bands", ["tiny-llama", "--bands", ""], "expected comma-separated bands",
     False),
    ("bands-width-0", "editing.compare_bands", ["tiny-llama", "--band-width", "0"], "--band-width: must be >= 1", False),
    ("bands-seed-negative", "editing.compare_bands", ["tiny-llama", "--seed", "-1"], "--seed: must be >= 0", False),
    ("bands-n-0", "editing.compare_bands", ["tiny-llama", "-n", "0"], "--n-edits: must be >= 1", False),
    ("bands-too-many-facts", "editing.compare_bands", ["tiny-llama", "-n", "100000"], "is too many", False),
    ("bands-corpus-missing", "editing.compare_bands", ["tiny-llama", "--corpus", "{tmp}/corpus.txt"],
     "no such file or folder exists", False),
    ("bands-out-dir-is-a-file", "editing.compare_bands", ["tiny-llama", "--out-dir", "{tmp}/afile.txt"],
     "is a file, not a folder", False),
    ("bands-unknown-model", "editing.compare_bands", ["no-such-model"], "Unknown model name 'no-such-model'", False),
    ("bands-width-above-layers", "editing.compare_bands", ["tiny-llama", "--band-width", "9"], "has 4 layers", True),
    # editing.key_stats
    ("key-stats-token-budget-0", "editing.key_stats", ["tiny-llama", "--token-budget", "0"],
     "--token-budget: must be >= 1", False),
    ("key-stats-checkpoint-negative", "editing.key_stats", ["tiny-llama", "--checkpoint-every", "-1"],
     "--checkpoint-every: must be >= 0", False),
    ("key-stats-corpus-missing", "editing.key_stats", ["tiny-llama", "--corpus", "{tmp}/corpus.txt"],
     "no such file or folder exists", False),
    ("key-stats-out-is-a-file", "editing.key_stats", ["tiny-llama", "--out", "{tmp}/afile.txt"],
     "is a file, not a folder", False),
    ("key-stats-layers-out-of-range", "editing.key_stats", ["tiny-llama", "--layers", "9"], "out of range", True),
    ("key-stats-no-known-layers", "editing.key_stats", ["tiny-llama"], "no critical layers known", True),
    # figures
    ("figure-trace-out-format", "figures.trace_eiffel", ["--model", "tiny-llama", "--out", "{tmp}/x.docx"],
     "format '.docx'", False),
    ("figure-trace-empty-model", "figures.trace_eiffel", ["--model", ""], "must not be empty", False),
    ("figure-locate-facts-0", "figures.locate_layers", ["--model", "tiny-llama", "--facts", "0"], "must be >= 1", False),
    ("figure-scaling-results-missing", "figures.memit_scaling", ["--results", "{tmp}/nope.json"], "does not exist",
     False),
    ("figure-scaling-results-bad", "figures.memit_scaling", ["--results", "{tmp}/results.json", "--out", "{tmp}/s.png"],
     "not a memit_scale.py result list", False),
    ("figure-edit-unknown-subject", "figures.edit_then_trace", ["--model", "tiny-llama", "--subject", "Atlantis"],
     "not the subject of a bundled known fact", False),
    ("figure-edit-layers", "figures.edit_then_trace", ["--model", "tiny-llama", "--layers", "1,x"],
     "comma-separated layer numbers", False),
    ("figure-edit-kinds", "figures.edit_then_trace", ["--model", "tiny-llama", "--kinds", "resid,neurons"],
     "expected comma-separated kinds", False),
    ("figure-edit-layers-out-of-range", "figures.edit_then_trace", ["--model", "tiny-llama", "--layers", "7"],
     "has layers 0 to 3", True),
    # editing.evaluate: every argument is checked before the model is loaded
    ("evaluate-unknown-method", "editing.evaluation_command", ["mend"], "invalid choice: 'mend'", False),
    ("evaluate-n-0", "editing.evaluation_command", ["grace", "-n", "0"], "--n-edits: must be >= 1", False),
    ("evaluate-batch-0", "editing.evaluation_command", ["grace", "--sequential", "--batch", "0"], "--batch: must be >= 1", False),
    ("evaluate-batch-without-sequential", "editing.evaluation_command", ["grace", "--batch", "4"], "add --sequential", False),
    ("evaluate-after-each-without-sequential", "editing.evaluation_command", ["grace", "--protocol", "after_each"],
     "add --sequential", False),
    ("evaluate-unknown-protocol", "editing.evaluation_command", ["grace", "--protocol", "sometimes"], "invalid choice", False),
    ("evaluate-unknown-scoring", "editing.evaluation_command", ["grace", "--scoring", "token,bleu"],
     "scorings from probability, token, generated or 'all'", False),
    ("evaluate-missing-dataset", "editing.evaluation_command", ["grace", "--dataset", "{tmp}/nope.json"], "does not exist", False),
    ("evaluate-empty-dataset", "editing.evaluation_command", ["grace", "--dataset", "{tmp}/empty.json"], "holds no facts", False),
    ("evaluate-too-many-facts", "editing.evaluation_command", ["grace", "--dataset", "{tmp}/no_target_new.json", "-n", "2"],
     "has 1 facts with distinct subjects; -n 2 is too many", False),
    ("evaluate-no-target-new", "editing.evaluation_command", ["grace", "--dataset", "{tmp}/no_target_new.json", "-n", "1"],
     "no new target", False),
    ("evaluate-set-not-a-field", "editing.evaluation_command", ["grace", "--set", "learning_rate=0.1"],
     "GraceConfig has no field learning_rate", False),
    ("evaluate-set-not-a-literal", "editing.evaluation_command", ["grace", "--set", "layer=two"], "must be a Python literal", False),
    ("evaluate-set-no-equals", "editing.evaluation_command", ["grace", "--set", "n_iter"], "expected FIELD=VALUE", False),
    ("evaluate-generation-cases-without-probability", "editing.evaluation_command",
     ["grace", "--scoring", "token", "--generation-cases", "1"], "include it in --scoring", False),
    ("evaluate-unknown-model", "editing.evaluation_command", ["grace", "--model", "gpt-7"], "Known names", False),
    ("evaluate-out-dir-is-a-file", "editing.evaluation_command", ["grace", "--out-dir", "{tmp}/afile.txt"], "is a file", False),
]
if torch.cuda.is_available():
    CLI_CASES = [case for case in CLI_CASES if case[0] != "heatmap-device"]
else:
    CLI_CASES.append(("heatmap-cuda-missing", "tracing.heatmap", ["tiny-llama", "--device", "cuda"],
                      "CUDA is not available", False))


def files_state(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folders`` with its size and modification time (a write changes them)."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for folder in folders
            for path in sorted(folder.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_llama):
    """The inputs in a fresh folder that is also the working folder; load_model hands out the shared tiny
    model (and records that it was asked); yields a check that nothing changed."""
    for name, content in INPUTS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    loads: list[str] = []
    real = models.load_model

    def load(name="smollm2", **kwargs):
        loads.append(name)
        return tiny_llama if name == "tiny-llama" else real(name, **kwargs)

    monkeypatch.setattr(models, "load_model", load)
    cache = models.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    before = weights_digest(tiny_llama), files_state(tmp_path, cache)

    def unchanged() -> None:
        assert weights_digest(tiny_llama) == before[0], "the model's weights changed"
        assert files_state(tmp_path, cache) == before[1], "files were written or changed"

    yield tmp_path, loads, unchanged


@pytest.mark.parametrize("module, argv, needle, loads_model", [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_command_line_refuses(module, argv, needle, loads_model, workspace, capsys):
    tmp, loads, unchanged = workspace
    main = importlib.import_module(module).main
    try:
        code = main([arg.replace("{tmp}", str(tmp)) for arg in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle.replace("{tmp}", str(tmp)) in err
    assert loads == (["tiny-llama"] if loads_model else []), "a model was loaded before the arguments were checked"
    unchanged()


# --- the API -----------------------------------------------------------------------------------------------

TINY_MEMIT = MemitConfig(layers=(1, 2), show_progress=False)

# (id, call(model, tmp), exception, text the message must contain)
API_CASES = [
    ("load-missing-folder", lambda m, tmp: load_model(str(tmp / "no" / "model")), UnknownModelError, "does not exist"),
    ("load-folder-not-a-model", lambda m, tmp: load_model(str(tmp / "notamodel")), UnknownModelError,
     "no config.json"),
    ("load-folder-without-weights", lambda m, tmp: load_model(str(tmp / "noweights")), UnknownModelError,
     "has config.json but no weights"),
    ("load-file", lambda m, tmp: load_model(str(tmp / "afile.txt")), UnknownModelError, "is a file"),
    ("load-unknown-name", lambda m, tmp: load_model("gpt-7"), UnknownModelError, "Known names"),
    ("load-empty-name", lambda m, tmp: load_model(" "), UnknownModelError, "empty"),
    ("trace-subject-not-in-prompt", lambda m, tmp: trace_prompt(m, PROMPT, "Louvre"), SubjectNotFoundError,
     "'Louvre' does not occur"),
    ("trace-empty-subject", lambda m, tmp: trace_prompt(m, PROMPT, " "), SubjectNotFoundError, "subject is empty"),
    ("trace-empty-answer", lambda m, tmp: trace_prompt(m, PROMPT, "Eiffel Tower", answer=" "), ValueError,
     "target is empty"),
    ("config-samples", lambda m, tmp: TraceConfig(samples=0), ValueError, "samples must be >= 1"),
    ("config-window", lambda m, tmp: TraceConfig(window=0), ValueError, "window must be >= 1"),
    ("config-noise", lambda m, tmp: TraceConfig(noise=-0.5), ValueError, "noise must be >= 0"),
    ("config-kinds", lambda m, tmp: TraceConfig(kinds=("neurons",)), ValueError, "kinds must be"),
    ("config-engine", lambda m, tmp: TraceConfig(engine="slow"), ValueError, "engine must be one of"),
    ("config-tokens", lambda m, tmp: TraceConfig(tokens="subject"), ValueError, "tokens must be one of"),
    ("config-method", lambda m, tmp: TraceConfig(method="gradient"), ValueError,
     "unknown method 'gradient'; expected one of ('exact', 'atp')"),
    ("config-corruption", lambda m, tmp: TraceConfig(corruption="blur"), ValueError,
     "unknown corruption 'blur'; expected one of ('gaussian', 'symmetric')"),
    ("config-metric", lambda m, tmp: TraceConfig(metric="rank"), ValueError,
     "unknown metric 'rank'; expected one of ('prob', 'logit_diff')"),
    ("config-direction", lambda m, tmp: TraceConfig(direction="sideways"), ValueError,
     "unknown direction 'sideways'; expected one of ('denoising', 'noising')"),
    ("trace-logit-diff-without-counterfactual",
     lambda m, tmp: trace_prompt(m, PROMPT, "Eiffel Tower", config=TraceConfig(metric="logit_diff")), ValueError,
     "metric 'logit_diff' needs a counterfactual answer"),
    ("trace-counterfactual-with-prob",
     lambda m, tmp: trace_prompt(m, PROMPT, "Eiffel Tower", counterfactual="Rome"), ValueError,
     "a counterfactual answer ('Rome') is only used with metric 'logit_diff', not 'prob'"),
    ("trace-counterfactual-is-answer",
     lambda m, tmp: trace_prompt(m, PROMPT, "Eiffel Tower", answer="Paris", counterfactual="Paris ",
                                 config=TraceConfig(metric="logit_diff")), ValueError,
     "the counterfactual answer 'Paris ' is the traced answer 'Paris'"),
    ("trace-fact-logit-diff-without-target-new",
     lambda m, tmp: trace_fact(m, dataclasses.replace(GERMANY, target_new=None), config=TraceConfig(metric="logit_diff")),
     ValueError, "fact 'Germany' has no target_new"),
    ("trace-symmetric-no-subject",
     lambda m, tmp: trace_prompt(m, "Xqzt Vbnm Plkj Wert Zzyx is in", "Xqzt Vbnm Plkj Wert Zzyx",
                                 config=TraceConfig(corruption="symmetric")), ValueError,
     "corruption 'symmetric': no subject of the bundled known facts takes the same 14 token(s)"),
    ("requests-none", lambda m, tmp: validate_requests(m, []), EditRequestError, "no edit requests"),
    ("requests-empty-target", lambda m, tmp: validate_requests(m, [dataclasses.replace(GERMANY, target_new=" ")]),
     EditRequestError, "request 0 ('Germany'): empty target_new ' '"),
    ("requests-target-is-true", lambda m, tmp: validate_requests(m, [SAME_TARGET]), EditRequestError,
     "request 0 ('Germany'): target_new ' Berlin ' is the true target 'Berlin'"),
    ("requests-conflict", lambda m, tmp: validate_requests(m, [GERMANY, dataclasses.replace(GERMANY, target_new="Oslo")]),
     EditRequestError, "request 1 ('Germany'): conflicting targets for the same subject and relation: 'Madrid' vs 'Oslo'"),
    ("apply-memit-target-is-true", lambda m, tmp: apply_memit(m, [GERMANY, SAME_TARGET], TINY_MEMIT), EditRequestError,
     "request 1 ('Germany'): target_new ' Berlin ' is the true target"),
    ("apply-memit-empty-target", lambda m, tmp: apply_memit(m, [dataclasses.replace(GERMANY, target_new="")], TINY_MEMIT),
     EditRequestError, "empty target_new ''"),
    ("apply-memit-layers-out-of-range", lambda m, tmp: apply_memit(m, [GERMANY], dataclasses.replace(TINY_MEMIT, layers=(9,))),
     ValueError, "out of range for a 4-layer model"),
    ("fact-subject-not-in-prompt", lambda m, tmp: fact_from_prompt(PROMPT, "Louvre", "Paris"), SubjectNotFoundError,
     "'Louvre' does not occur in prompt"),
    ("fact-empty-subject", lambda m, tmp: fact_from_prompt(PROMPT, "", "Paris"), SubjectNotFoundError,
     "the subject is empty"),
    ("fact-template-without-slot", lambda m, tmp: Fact("Germany", "The capital is", "Berlin"), ValueError,
     "exactly one '{}' slot"),
    ("trace-load-missing", lambda m, tmp: FactTrace.load(tmp / "nope.npz"), FileNotFoundError, "does not exist"),
    ("trace-load-not-a-trace", lambda m, tmp: FactTrace.load(tmp / "trace.npz"), ValueError,
     "is not a trace saved by FactTrace.save"),
    ("facts-load-other-format", lambda m, tmp: load_facts(tmp / "other.json"), ValueError, "neither CounterFact"),
]


@pytest.mark.parametrize("call, error, needle", [case[1:] for case in API_CASES], ids=[case[0] for case in API_CASES])
def test_api_refuses(call, error, needle, workspace, tiny_llama):
    tmp, _, unchanged = workspace
    with pytest.raises(error) as raised:
        call(tiny_llama, tmp)
    assert needle in str(raised.value)
    unchanged()


def test_the_tables_are_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 40
    assert len({case[0] for case in CLI_CASES + API_CASES}) == len(CLI_CASES) + len(API_CASES)


def test_the_command_line_constants_agree_with_the_library():
    from tracing import adapter, average, cli

    assert cli.DEFAULT_MODEL == models.EMBEDDED_MODEL
    assert cli.KINDS == adapter.KINDS
    assert cli.SELECTION_METHODS == average.SELECTION_METHODS
    from tracing import attribution, causal_trace, corruption, metrics

    assert cli.TRACE_METHODS == causal_trace.METHODS and cli.CORRUPTIONS == corruption.CORRUPTIONS
    assert cli.METRICS == metrics.METRICS and cli.DIRECTIONS == attribution.DIRECTIONS
    assert cli.ATP_SPACES == attribution.SPACES
    from editing import cli as editing_cli, protocol, scoring
    from editing.editor import methods

    assert editing_cli.EDIT_METHODS == tuple(sorted(methods()))
    assert editing_cli.SCORINGS == scoring.SCORINGS and editing_cli.PROTOCOLS == protocol.PROTOCOLS


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0, stop.code
assert "torch" not in sys.modules, "torch was imported to answer --help"
"""


@pytest.mark.parametrize("module", [
    "tracing.heatmap", "tracing.locate", "editing.memit", "editing.evaluate", "figures.trace_eiffel", "figures.locate_layers",
    "figures.memit_scaling", "figures.edit_then_trace", "editing.compare_bands",
])
def test_help_answers_without_importing_torch(module):
    """--help must answer in well under 2 s, so it may not import torch (about 2 s alone on 2 cores)."""
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, module], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
