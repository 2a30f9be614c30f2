"""Where a model's weights go: one device, or split over several GPUs by accelerate's device map.

Nothing here shards by hand. A single device is ``model.to(device)``; a split is a Hugging Face
``device_map`` (``"auto"``, ``"balanced"``, an explicit ``{module: device}`` dict) that ``from_pretrained``
or ``accelerate.dispatch_model`` applies, and a device *count* becomes such a dict through accelerate's
``get_balanced_memory`` + ``infer_auto_device_map`` on an empty (meta) copy of the model — a pure
function of the config and the per-device budgets, so it is computed and tested without GPUs.

Once loaded, the bridge's ``cfg.device`` is the device of the input embedding (TransformerLens sets it
from ``hf_device_map``): inputs start there (:func:`input_device`), and accelerate's hooks move the
hidden states from block to block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Union

import torch

DeviceMap = Union[str, int, Mapping[str, Union[int, str]]]
SPLIT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class PlacementError(ValueError):
    """The requested device, dtype or device map cannot be used here; raised before anything loads."""


@dataclass(frozen=True)
class Placement:
    """How to load one model: a single ``device``, or a ``device_map`` (then ``device`` is None)."""

    device: torch.device | None
    dtype: torch.dtype
    device_map: str | dict[str, int | str] | None = None
    n_devices: int | None = None  # a device count still to be turned into a dict (needs the config)

    @property
    def split(self) -> bool:
        return self.device_map is not None or self.n_devices is not None


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"float32"``, ``torch.float16``, ... as a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = DTYPES.get(str(dtype).strip().lower().removeprefix("torch."))
    if found is None:
        raise PlacementError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(DTYPES))}")
    return found


def resolve_placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                      device_map: DeviceMap | None = None, *, preferred_gpu_dtype: torch.dtype = torch.float32,
                      cuda_count: int | None = None) -> Placement:
    """Check a request against the devices present (``cuda_count``: CUDA devices, default torch's count)
    and fill in defaults: CUDA when present, the model's preferred dtype on GPU, float32 on CPU."""
    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise PlacementError("pass either device or device_map, not both (a device map places every module)")
    if device_map is None:
        target = single_device(device, cuda_count)
        if dtype is None:
            dtype = preferred_gpu_dtype if target.type == "cuda" else torch.float32
        return Placement(target, dtype)
    if dtype is None:
        dtype = preferred_gpu_dtype if cuda_count else torch.float32
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, Mapping)):
        raise PlacementError(f"device_map must be one of {SPLIT_STRATEGIES}, a device count or a dict, "
                             f"not {device_map!r}")
    if isinstance(device_map, int):
        if device_map < 1:
            raise PlacementError(f"device_map={device_map}: a device count must be at least 1")
        if device_map > cuda_count:
            raise PlacementError(f"device_map={device_map} asks for {device_map} CUDA devices, there are "
                                 f"{cuda_count} here" + ("" if cuda_count else " (use --device cpu)"))
        return Placement(None, dtype, n_devices=device_map)
    if isinstance(device_map, str):
        if device_map not in SPLIT_STRATEGIES:
            raise PlacementError(f"device_map={device_map!r}: expected one of {SPLIT_STRATEGIES}, a device "
                                 "count or a dict")
        if not cuda_count:
            raise PlacementError(f"device_map={device_map!r} splits a model over GPUs, and CUDA is not "
                                 "available here (use --device cpu)")
        return Placement(None, dtype, device_map=device_map)
    for module, target in device_map.items():
        if isinstance(target, int) or str(target).startswith("cuda"):
            index = target if isinstance(target, int) else torch.device(target).index or 0
            if index >= cuda_count:
                raise PlacementError(f"device_map puts {module!r} on CUDA device {index}, there are "
                                     f"{cuda_count} here" + ("" if cuda_count else " (use --device cpu)"))
        elif str(target) != "cpu":
            raise PlacementError(f"device_map puts {module!r} on {target!r}; only CUDA devices and 'cpu' are "
                                 "supported (no disk or meta offload)")
    return Placement(None, dtype, device_map=dict(device_map))


def single_device(device: str | torch.device | None, cuda_count: int) -> torch.device:
    """The one device asked for (None: CUDA when present, else CPU), refused when it is not here."""
    if device is None:
        return torch.device("cuda" if cuda_count else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PlacementError(f"device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if target.type == "cuda":
        if not cuda_count:
            raise PlacementError(f"device {str(device)!r}: CUDA is not available here (use --device cpu)")
        if target.index is not None and target.index >= cuda_count:
            raise PlacementError(f"device {str(device)!r}: there are {cuda_count} CUDA devices here")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise PlacementError(f"device {str(device)!r}: MPS is not available here (use --device cpu)")
    return target


def plan_device_map(config, n_devices: int, dtype: torch.dtype,
                    max_memory: Mapping[int, int | str] | None = None) -> dict[str, int]:
    """Accelerate's balanced split of the model ``config`` describes over CUDA devices ``0..n-1``.

    ``max_memory`` (bytes or "80GiB" per device) defaults to the free memory of each GPU. Whole
    transformer blocks stay on one device (the model's ``_no_split_modules``) and tied weights together.
    Raises :class:`PlacementError` when the model does not fit in the budgets.
    """
    from accelerate import init_empty_weights, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    from transformers import AutoModelForCausalLM

    if max_memory is None:
        max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(n_devices)}
    budgets = {i: max_memory[i] for i in range(n_devices)}
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Device 0 is not available": the plan is for GPUs elsewhere or later
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            balanced = budgets if n_devices == 1 else get_balanced_memory(
                empty, max_memory=budgets, no_split_module_classes=no_split, dtype=dtype)
            plan = infer_auto_device_map(empty, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    finally:
        quiet.setLevel(level)
    misplaced = sorted({str(target) for target in plan.values() if not isinstance(target, int)})
    if misplaced:
        raise PlacementError(f"the model does not fit on {n_devices} device(s) with budgets {dict(budgets)}: "
                             f"accelerate would put parts on {', '.join(misplaced)}")
    return dict(plan)


def input_device(model) -> torch.device:
    """Where a bridge's inputs go: its input embedding's device (``cfg.device``; under a device map
    TransformerLens sets it from ``hf_device_map``)."""
    device = getattr(model.cfg, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    """The dtype of the bridge's weights (its input embedding's)."""
    return model.embed.original_component.weight.dtype
