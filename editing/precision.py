"""Whether a lower-precision dtype is actually faster for matrix products on this device.

``TargetConfig(autocast="bfloat16")`` is 1.9x faster on CPUs with bf16 matrix units (docs/memit_speed.md),
but on a CPU without them PyTorch emulates bf16 and the same product runs far slower than in float32
(measured on a 2-core AMD EPYC: 1.2 GFLOP/s against 56, 46x slower). The editor cannot know the CPU's
units in advance, so it times one small product in each dtype, once per process, and warns
when autocast would slow the optimisation down instead of speeding it up.
"""

from __future__ import annotations

import functools
import time
import warnings

import torch

SHAPE = (32, 256, 256)  # (rows, inner, columns): about 4 MFLOP, milliseconds even where bf16 is emulated
REPEATS = 3


def matmul_seconds(dtype: str) -> float:
    """The fastest of a few timed products of :data:`SHAPE` in ``dtype`` on the CPU."""
    rows, inner, columns = SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator).to(getattr(torch, dtype))
    b = torch.randn(inner, columns, generator=generator).to(getattr(torch, dtype))
    a @ b  # warm up (kernel choice, lazy initialisation)
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


@functools.lru_cache(maxsize=None)
def slowdown(dtype: str) -> float:
    """How many times slower a product runs in ``dtype`` than in float32 on this CPU (below 1: faster)."""
    return matmul_seconds(dtype) / max(matmul_seconds("float32"), 1e-9)


_WARNED: set[str] = set()  # dtypes already warned about


def warn_if_slower(device_type: str, dtype: str) -> None:
    """Warn, once per process and dtype, when autocast to ``dtype`` on the CPU is slower than float32 there.
    Other devices are not timed: half-precision units are the norm on GPUs."""
    if device_type != "cpu" or dtype in _WARNED:
        return
    ratio = slowdown(dtype)
    if ratio > 1.0:
        _WARNED.add(dtype)
        warnings.warn(f"autocast to {dtype}: matrix products run {ratio:.1f}x slower than float32 on this CPU "
                      f"(no {dtype} units), so the optimisation will be slower, not faster; leave "
                      "TargetConfig.autocast at None (docs/memit_speed.md)", stacklevel=3)
