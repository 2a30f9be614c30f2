"""Causal tracing of one fact: corrupt the subject, restore one state at a time, read p(answer).

How is a config value (:class:`TraceConfig`): ``method`` exact (ROME) or ``atp`` (attribution patching,
:mod:`tracing.attribution`), ``corruption`` Gaussian noise or symmetric token replacement
(:mod:`tracing.corruption`), ``metric`` p(answer) or a logit difference against a counterfactual answer
(:mod:`tracing.metrics`), ``direction`` denoising (restore clean states in the corrupted run, ROME) or
noising (corrupt one state of the clean run). Every choice is recorded in the trace and its figure.

The public entry points are :func:`trace_fact` (a :class:`~tracing.facts.Fact`) and :func:`trace_prompt`
(a prompt and its subject). Both return a :class:`FactTrace` holding, for every kind of state and every
(token, layer), the probability of the answer after restoring that state; its indirect effect is that
probability minus the corrupted one.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tracing.adapter import KINDS, ModelAdapter
from tracing.attribution import (DIRECTIONS, attribution_patching, attribution_patching_batch, check_direction,
                                 check_space, check_steps)
from tracing.blocks import EngineUnsupported
from tracing.corruption import Corruption, check_corruption, gaussian, symmetric
from tracing.engine import Cell, EngineOutput, PrefixEngine, ReferenceEngine, TraceInputs, needs_full_forwards
from tracing.facts import Fact, encode_fact, fact_from_prompt
from tracing.io import atomic_path
from tracing.metrics import check_metric
from tracing.models import model_spec
from tracing.noise import DEFAULT_NOISE_MULTIPLIER, default_noise_std
from tracing.placement import input_device, model_dtype
from tracing.state import state_of
from tracing.tokens import EncodedPrompt, encode_with_offsets, subject_token_range, target_token_ids, token_strings

ENGINES = ("fast", "reference")
METHODS = ("exact", "atp")
TOKEN_SELECTIONS = ("all", "last subject")
_VERIFY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class TraceConfig:
    """How to trace. Defaults follow ROME: 10 noise samples, noise 3x the subject-embedding std, window 10.

    ``noise`` sets the absolute noise std and overrides ``noise_multiplier``. ``engine="reference"``
    runs one forward pass per cell, exactly like kmeng01/rome (slow; for checking). With ``verify`` the
    fast engine is checked against the reference on a few cells the first time a model is traced.

    ``method="atp"`` estimates every cell by attribution patching instead of restoring it (one backward,
    see :mod:`tracing.attribution`); ``corruption="symmetric"`` swaps the subject for up to ``samples``
    other subjects of the same token length instead of adding noise; ``metric="logit_diff"`` scores
    logit(answer) - logit(counterfactual); ``direction="noising"`` corrupts one state of the clean run
    (exact noising runs on the reference engine). Unknown values are refused here, before any forward.
    """

    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    noise: float | None = None
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER
    window: int = 10
    seed: int = 1
    engine: str = "fast"
    verify: bool = True
    show_progress: bool = True
    method: str = "exact"
    corruption: str = "gaussian"
    metric: str = "prob"
    direction: str = "denoising"
    tokens: str = "all"
    fact_batch: int = 8  # facts per forward/backward when many facts are scanned (method "atp")
    atp_steps: int = 1  # method "atp": gradients averaged over this many noise scales (1: plain AtP)
    atp_space: str = "log_odds"  # method "atp": linear in the answer's log-odds ("log_odds") or the metric itself

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        check_corruption(self.corruption)
        check_metric(self.metric)
        check_direction(self.direction)
        check_steps(self.atp_steps, self.direction)
        check_space(self.atp_space)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {self.tokens!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.fact_batch < 1:
            raise ValueError("fact_batch must be >= 1")
        if self.noise is not None and self.noise < 0:
            raise ValueError("noise must be >= 0")


@dataclass
class FactTrace:
    """Everything one causal trace measured. ``scores[kind][t, l]`` is the mean p(answer) after
    restoring state ``kind`` at token ``t`` and layer ``l`` (a window of layers centred on ``l`` for
    ``mlp``/``attn``) in the corrupted run.

    With ``metric="logit_diff"`` every "prob" (``clean_prob``, ``corrupted_prob``, ``scores``) holds
    logit(answer) - logit(counterfactual) instead; with ``direction="noising"`` a score is the clean
    run's metric with that one state corrupted; with ``method="atp"`` the scores are linear estimates.
    ``noise`` is 0 for symmetric replacement, whose subjects are in ``replacements``."""

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    clean_top: str
    clean_prob: float
    corrupted_prob: float
    noise: float
    samples: int
    window: int
    seed: int
    model_name: str
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    engine: str = "fast"  # which engine computed the scores ("fast", "reference"; "atp"), see choose_engine
    method: str = "exact"  # "exact" (restored runs) or "atp" (attribution patching estimates)
    corruption: str = "gaussian"  # or "symmetric" (token replacement)
    replacements: tuple[str, ...] = ()  # the subjects swapped in by symmetric replacement
    metric: str = "prob"  # or "logit_diff" (against ``counterfactual``)
    counterfactual: str | None = None
    direction: str = "denoising"  # or "noising"
    atp_space: str | None = None  # method "atp": where the estimate was linear ("log_odds", "metric"); files
    # saved before 2026-12-07 load with None (their AtP estimates were linear in the metric)

    @property
    def correct(self) -> bool:
        """Whether the clean model's top-1 next token is the traced answer (ROME skips facts where not)."""
        return self.clean_top == self.answer

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])

    def indirect_effect(self, kind: str) -> np.ndarray:
        """p(answer | restored) - p(answer | corrupted), per (token, layer). Noising: p(answer | clean) -
        p(answer | that state corrupted), so that in both directions a large value marks a state that matters."""
        if self.direction == "noising":
            return self.clean_prob - self.scores[kind]
        return self.scores[kind] - self.corrupted_prob

    # --- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save as ``.npz`` (scores as arrays, the rest as JSON metadata), atomically."""
        meta = {k: v for k, v in asdict(self).items() if k != "scores"}
        arrays = {f"scores_{kind}": values for kind, values in self.scores.items()}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "FactTrace":
        """A trace written by :meth:`save`. A missing file raises ``FileNotFoundError``; a file that is not
        a saved trace raises ``ValueError`` saying so."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trace file '{path}' does not exist" if not path.exists()
                                    else f"'{path}' is a folder, not a trace file")
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                scores = {key[len("scores_"):]: data[key] for key in data.files if key.startswith("scores_")}
            meta["subject_range"] = tuple(meta["subject_range"])
            meta["replacements"] = tuple(meta.get("replacements", ()))
            return cls(**meta, scores=scores)
        except (ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"'{path}' is not a trace saved by FactTrace.save ({type(error).__name__}: {error})") from error


def noise_std(model, config: TraceConfig) -> float:
    return config.noise if config.noise is not None else default_noise_std(model, config.noise_multiplier)


def trace_fact(model, fact: Fact, *, answer: str | None = None, counterfactual: str | None = None,
               config: TraceConfig = TraceConfig()) -> FactTrace:
    """Trace ``fact``; the traced answer is ``answer`` if given, else ``fact.target_true``.

    Pass ``answer=fact.target_new`` after an edit to see where the new answer is read from. Under
    ``metric="logit_diff"`` the counterfactual answer is ``counterfactual``, else ``fact.target_new``.
    """
    return _trace(model, _prepare_fact(model, fact, answer, counterfactual, config), config)


def _prepare_fact(model, fact: Fact, answer: str | None, counterfactual: str | None,
                  config: TraceConfig) -> _Prepared:
    answer = answer if answer is not None else fact.target_true
    if config.metric == "logit_diff" and counterfactual is None:
        if fact.target_new is None:
            raise ValueError(f"metric 'logit_diff' needs a counterfactual answer, and fact {fact.subject!r} has no "
                             "target_new; pass counterfactual=...")
        counterfactual = fact.target_new
    counterfactual_id = _counterfactual_id(model, answer, counterfactual, config)
    encoded, subject_range = encode_fact(model, fact)
    corruption = _corruption(model, encoded, fact.subject, fact.subject_char_start, subject_range, config)
    answer_id = target_token_ids(model, answer)[0]
    return _prepared(model, _Prepared(encoded.text, list(encoded.ids), fact.subject, subject_range, answer_id,
                                      corruption, counterfactual, counterfactual_id))


def trace_facts_scanned(model, facts: Sequence[Fact], config: TraceConfig) -> list[FactTrace]:
    """:func:`trace_fact` of each fact under ``method="atp"``, ``config.fact_batch`` facts per forward and
    backward (the same numbers as one at a time, in fewer, larger batches)."""
    if config.method != "atp":
        raise ValueError(f"only the atp scan traces many facts in one batch, not method {config.method!r}")
    prepared = [_prepare_fact(model, fact, None, None, config) for fact in facts]
    traces = []
    for start in range(0, len(prepared), config.fact_batch):
        chunk = prepared[start: start + config.fact_batch]
        outputs = attribution_patching_batch(model, [p.inputs for p in chunk], config.kinds, config.window,
                                             config.direction, config.atp_steps, config.atp_space)
        traces += [_finished(model, p, output, "atp", config) for p, output in zip(chunk, outputs)]
    return traces


def trace_prompt(model, prompt: str, subject: str, *, answer: str | None = None, counterfactual: str | None = None,
                 config: TraceConfig = TraceConfig()) -> FactTrace:
    """Trace a prompt containing ``subject``; the answer defaults to the model's own top-1 prediction.
    ``counterfactual`` is the other answer of ``metric="logit_diff"`` (needed there, refused elsewhere)."""
    encoded = encode_with_offsets(model, prompt)
    subject_range = subject_token_range(encoded, subject)
    counterfactual_id = _counterfactual_id(model, answer, counterfactual, config)
    corruption = _corruption(model, encoded, subject, prompt.find(subject.strip()), subject_range, config)
    if answer is not None:
        answer_id = target_token_ids(model, answer)[0]
    else:
        with torch.no_grad():
            answer_id = int(model(encoded.tensor(_device(model)))[0, -1].argmax())
    return _trace(model, _prepared(model, _Prepared(prompt, list(encoded.ids), subject.strip(), subject_range,
                                                    answer_id, corruption, counterfactual, counterfactual_id)), config)


def _counterfactual_id(model, answer: str | None, counterfactual: str | None, config: TraceConfig) -> int | None:
    """The first token of the counterfactual answer under ``metric="logit_diff"`` (None otherwise),
    refusing a missing one, one given to another metric, and one equal to the answer (before any forward)."""
    if config.metric != "logit_diff":
        if counterfactual is not None:
            raise ValueError(f"a counterfactual answer ({counterfactual!r}) is only used with metric 'logit_diff', "
                             f"not {config.metric!r}")
        return None
    if counterfactual is None:
        raise ValueError("metric 'logit_diff' needs a counterfactual answer (counterfactual=...)")
    counterfactual_id = target_token_ids(model, counterfactual)[0]
    if answer is not None:
        _check_counterfactual(model, target_token_ids(model, answer)[0], answer, counterfactual_id, counterfactual)
    return counterfactual_id


def _check_counterfactual(model, answer_id: int, answer: str, counterfactual_id: int, counterfactual: str) -> None:
    if counterfactual.strip() == answer.strip():
        raise ValueError(f"the counterfactual answer {counterfactual!r} is the traced answer {answer!r}; "
                         "logit_diff needs a different one")
    if counterfactual_id == answer_id:
        raise ValueError(f"the counterfactual answer {counterfactual!r} starts with the same token "
                         f"{model.tokenizer.decode([answer_id])!r} as the traced answer {answer!r}; "
                         "logit_diff compares first tokens, so it needs one that starts differently")


def _corruption(model, encoded: EncodedPrompt, subject: str, char_start: int, subject_range: tuple[int, int],
                config: TraceConfig) -> Corruption:
    """The corrupted rows' embedding offsets (refuses a symmetric replacement that finds no subject)."""
    if config.corruption == "symmetric":
        return symmetric(model, encoded, subject, char_start, subject_range, config.samples, config.seed)
    start, end = subject_range
    return gaussian(config.samples, end - start, ModelAdapter.of(model).d_model, noise_std(model, config), config.seed)


def _device(model) -> torch.device:
    return input_device(model)


def _dtype(model) -> torch.dtype:
    return model_dtype(model)


@dataclass
class _Prepared:
    """One fact ready to trace: its tokens, subject, answer, corruption and (once on the device) inputs."""

    prompt: str
    ids: list[int]
    subject: str
    subject_range: tuple[int, int]
    answer_id: int
    corruption: Corruption
    counterfactual: str | None
    counterfactual_id: int | None
    inputs: TraceInputs | None = None


def _prepared(model, prepared: _Prepared) -> _Prepared:
    """Check the counterfactual against the answer and build the engine inputs on the model's device."""
    if prepared.counterfactual_id is not None:
        answer = model.tokenizer.decode([prepared.answer_id])
        _check_counterfactual(model, prepared.answer_id, answer, prepared.counterfactual_id, prepared.counterfactual)
    prepared.inputs = TraceInputs(
        tokens=torch.tensor([prepared.ids], device=_device(model)),
        subject=prepared.subject_range,
        answer_id=prepared.answer_id,
        noise=prepared.corruption.delta.to(device=_device(model), dtype=_dtype(model)),
        counterfactual_id=prepared.counterfactual_id,
    )
    return prepared


def _trace(model, prepared: _Prepared, config: TraceConfig) -> FactTrace:
    if config.method == "atp":
        output, engine = attribution_patching(model, prepared.inputs, config.kinds, config.window,
                                              config.direction, config.atp_steps, config.atp_space), "atp"
    else:
        output, engine = _run_engine(model, prepared.inputs, config)
    return _finished(model, prepared, output, engine, config)


def _finished(model, prepared: _Prepared, output: EngineOutput, engine: str, config: TraceConfig) -> FactTrace:
    """The :class:`FactTrace` of an engine's output (cells outside ``config.tokens`` marked NaN)."""
    decode = model.tokenizer.decode
    ids, subject_range, corruption = prepared.ids, prepared.subject_range, prepared.corruption
    scores = {kind: output.scores[kind] for kind in config.kinds}
    traced = traced_tokens(config, subject_range, len(ids))
    if traced is not None:  # cells outside the selection were not computed (or were estimated): say so
        untraced = np.setdiff1d(np.arange(len(ids)), traced)
        scores = {kind: _with_nan_rows(values, untraced) for kind, values in scores.items()}
    return FactTrace(
        prompt=prepared.prompt,
        subject=prepared.subject,
        tokens=token_strings(model, ids),
        token_ids=ids,
        subject_range=subject_range,
        answer=decode([prepared.answer_id]),
        answer_id=prepared.answer_id,
        clean_top=decode([output.clean_top_id]),
        clean_prob=output.clean_prob,
        corrupted_prob=output.corrupted_prob,
        noise=corruption.noise,
        samples=corruption.rows,
        window=config.window,
        seed=config.seed,
        model_name=model_spec(model).name,
        scores=scores,
        engine=engine,
        method=config.method,
        corruption=corruption.kind,
        replacements=corruption.replacements,
        metric=config.metric,
        counterfactual=prepared.counterfactual,
        direction=config.direction,
        atp_space=config.atp_space if config.method == "atp" else None,
    )


def traced_tokens(config: TraceConfig, subject_range: tuple[int, int], n_tokens: int) -> list[int] | None:
    """The token positions ``config.tokens`` selects, or None for every token."""
    if config.tokens == "all":
        return None
    return [subject_range[1] - 1]


def _with_nan_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    values = np.array(values, dtype=float)
    values[rows] = np.nan
    return values


def choose_engine(model, config: TraceConfig) -> tuple[str, str]:
    """Which engine traces ``model`` under ``config``, and why: ``("reference", reason)`` when asked for,
    when the fast engine was refused on this model earlier (unsupported, or it disagreed with the
    reference), or while a hook needs whole-prompt forward passes (WISE's router); else ``"fast"``."""
    if config.engine == "reference":
        return "reference", "asked for"
    if config.direction == "noising":
        return "reference", "exact noising runs on the reference engine"
    if state_of(model).fast_engine_ok is False:
        return "reference", "the fast engine was refused on this model"
    if needs_full_forwards(model):
        return "reference", f"hooks need whole-prompt forwards ({', '.join(sorted(state_of(model).full_forwards))})"
    return "fast", "verified on this model" if state_of(model).fast_engine_ok else "default"


def _run_engine(model, inputs: TraceInputs, config: TraceConfig) -> tuple[EngineOutput, str]:
    """The engine's output and the name of the engine that produced it (see :func:`choose_engine`)."""
    state = state_of(model)
    reference = ReferenceEngine(model, show_progress=config.show_progress)
    tokens = traced_tokens(config, inputs.subject, inputs.n_tokens)
    if choose_engine(model, config)[0] == "reference":
        return reference.run(inputs, config.kinds, config.window, config.direction, tokens), "reference"
    try:
        output = PrefixEngine(model, show_progress=config.show_progress).run(inputs, config.kinds, config.window,
                                                                                tokens)
    except EngineUnsupported as error:
        warnings.warn(f"fast tracing engine unavailable for this model ({error}); using the reference engine")
        state.fast_engine_ok = False
        return reference.run(inputs, config.kinds, config.window, config.direction, tokens), "reference"
    if config.verify and not state.fast_engine_ok:
        mismatch = _largest_mismatch(reference, inputs, output, config)
        if mismatch > _VERIFY_TOLERANCE:
            warnings.warn(
                f"fast tracing engine disagrees with the reference by {mismatch:.2e} on this model; "
                "falling back to the reference engine (slower, same numbers as kmeng01/rome)"
            )
            state.fast_engine_ok = False
            return reference.run(inputs, config.kinds, config.window, config.direction, tokens), "reference"
        state.fast_engine_ok = True
    return output, "fast"


def _largest_mismatch(reference: ReferenceEngine, inputs: TraceInputs, output: EngineOutput,
                      config: TraceConfig) -> float:
    """Recompute one middle-layer cell per kind at the last subject token with the reference engine."""
    token = inputs.subject[1] - 1
    layer = reference.adapter.n_layers // 2
    worst = abs(reference.corrupted_prob(inputs) - output.corrupted_prob)
    for kind in config.kinds:
        expected = reference.cell_prob(inputs, Cell(kind, token, layer), config.window)
        worst = max(worst, abs(expected - float(output.scores[kind][token, layer])))
    return worst


__all__ = ["TraceConfig", "FactTrace", "trace_fact", "trace_prompt", "noise_std", "fact_from_prompt", "choose_engine",
           "METHODS", "DIRECTIONS", "TOKEN_SELECTIONS", "traced_tokens"]
