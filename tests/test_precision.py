"""Autocast to a dtype this CPU has no units for warns instead of silently running many times slower."""

import math
import warnings

import pytest

from editing import precision


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    """Each test times (or fakes) its own products and may warn again."""
    precision.slowdown.cache_clear()
    monkeypatch.setattr(precision, "_WARNED", set())
    yield
    precision.slowdown.cache_clear()


def _fake_seconds(monkeypatch, seconds: dict[str, float]) -> None:
    monkeypatch.setattr(precision, "matmul_seconds", lambda dtype: seconds[dtype])


def test_a_product_is_timed_in_each_dtype():
    for dtype in ("float32", "bfloat16"):
        seconds = precision.matmul_seconds(dtype)
        assert 0 < seconds < 5 and math.isfinite(seconds)
    assert precision.slowdown("bfloat16") > 0


def test_slower_low_precision_warns_once_with_the_ratio(monkeypatch):
    _fake_seconds(monkeypatch, {"float32": 0.001, "bfloat16": 0.046})
    with pytest.warns(UserWarning, match=r"bfloat16: matrix products run 46.0x slower than float32"):
        precision.warn_if_slower("cpu", "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_slower("cpu", "bfloat16")  # once per process


def test_faster_low_precision_and_gpus_stay_silent(monkeypatch):
    _fake_seconds(monkeypatch, {"float32": 0.002, "bfloat16": 0.001})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_slower("cpu", "bfloat16")
        precision.warn_if_slower("cuda", "float16")  # not timed: would fail without a GPU if it were
    assert precision.slowdown("bfloat16") == pytest.approx(0.5)


def test_the_target_optimisation_warns_where_autocast_is_slower(tiny_llama, monkeypatch):
    """Through MEMIT's target optimisation: the warning names the slowdown, and the targets still come out."""
    from editing.memit import MemitConfig, memit_targets
    from editing.targets import TargetConfig
    from tracing.facts import Fact

    _fake_seconds(monkeypatch, {"float32": 0.001, "bfloat16": 0.010})
    config = MemitConfig(layers=(1,), show_progress=False, targets=TargetConfig(steps=2, autocast="bfloat16"))
    request = Fact(subject="Germany", template="The capital of {} is", target_true="Berlin", target_new="Madrid")
    with pytest.warns(UserWarning, match="10.0x slower"):
        targets = memit_targets(tiny_llama, [request], config)
    assert targets.shape[0] == 1 and bool(targets.isfinite().all())
