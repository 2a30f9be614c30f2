"""What every ``python -m ...`` command line shares: argument checks that run before a model is loaded, and
one way to report a user's mistake.

A user error never ends in a traceback: :func:`fail` prints one line ``error: ...`` on stderr and exits
with status 2 (argparse's own status for bad arguments), and :class:`ArgumentParser` reports its errors
the same way. Argument types here (:func:`int_at_least`, :func:`text`, :func:`figure_file`, ...) refuse
out-of-range numbers, empty strings, missing files and unsupported formats while the arguments are parsed.

This module imports nothing heavy (no torch, no transformers), so ``--help`` and refusals of bad arguments
answer at once; the few checks that need more (:func:`check_device`, :func:`check_answer`) import it when
they run.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

# Copies of tracing.models.EMBEDDED_MODEL, tracing.adapter.KINDS, tracing.average.SELECTION_METHODS,
# tracing.causal_trace.METHODS, tracing.corruption.CORRUPTIONS, tracing.metrics.METRICS,
# tracing.attribution.DIRECTIONS and tracing.attribution.SPACES, which cannot be imported without torch (tests/test_bad_inputs.py checks
# that they agree).
DEFAULT_MODEL = "smollm2"
KINDS = ("resid", "mlp", "attn")
SELECTION_METHODS = ("peak-end", "max-sum")
TRACE_METHODS = ("exact", "atp")
CORRUPTIONS = ("gaussian", "symmetric")
METRICS = ("prob", "logit_diff")
DIRECTIONS = ("denoising", "noising")
ATP_SPACES = ("log_odds", "metric")


def fail(message: object) -> NoReturn:
    """Report a user error as one line ``error: ...`` on stderr and exit with status 2."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {' '.join(lines) or 'invalid input'}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Turn the library's exceptions of ``types`` (a missing model, a subject not in its prompt, ...)
    into :func:`fail`: they are the user's to fix, not bugs to show a traceback for."""
    try:
        yield
    except types as error:
        fail(error)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: ...``, status 2), like :func:`fail`."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


# --- argument types ----------------------------------------------------------------------------------


def text(value: str) -> str:
    """A string that must not be empty or blank."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number

    return parse


def float_above(minimum: float, *, inclusive: bool = True) -> Callable[[str], float]:
    """A finite number >= ``minimum`` (> ``minimum`` unless ``inclusive``)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
        if number < minimum or (number == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {number:g}")
        return number

    return parse


def layer_list(value: str) -> tuple[int, ...]:
    """Comma-separated layer indices, e.g. ``3,4,5`` (checked against the model once it is loaded)."""
    parts = [part.strip() for part in value.split(",")]
    if not value.strip() or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 3,4,5, got {value!r}")
    return tuple(int(part) for part in parts)


def choice_list(value: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Comma-separated names from ``choices`` (duplicates dropped, order kept), or ``all`` for every one."""
    if value.strip() == "all":
        return choices
    names = tuple(part.strip() for part in value.split(","))
    if not value.strip() or any(name not in choices for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what} from {', '.join(choices)} or 'all', "
                                         f"got {value!r}")
    return tuple(dict.fromkeys(names))


def kind_list(value: str) -> tuple[str, ...]:
    """Comma-separated kinds of state (``resid``, ``mlp``, ``attn``), or ``all``."""
    return choice_list(value, KINDS, "kinds")


def existing_file(value: str) -> Path:
    """A file that exists."""
    path = Path(text(value)).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file '{path}' does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"'{path}' is a folder, not a file")
    return path


def facts_source(value: str) -> Path | str:
    """A registered dataset name (returned as given) or an existing file."""
    from tracing.dataset_sources import dataset_names, dataset_source

    if dataset_source(text(value)) is not None and not Path(value).expanduser().exists():
        return value.strip()
    if not Path(text(value)).expanduser().exists():
        raise argparse.ArgumentTypeError(f"file '{Path(value).expanduser()}' does not exist, and it is no dataset "
                                         f"name (known: {', '.join(dataset_names())})")
    return existing_file(value)


def output_file(value: str) -> Path:
    """A file to write: not an existing folder, not inside an existing file."""
    path = Path(text(value)).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{path}' is a folder; give a file name")
    _check_parents(path)
    return path


def output_folder(value: str) -> Path:
    """A folder to write into (made if missing): not an existing file."""
    path = Path(text(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"'{path}' is a file, not a folder")
    _check_parents(path)
    return path


def _check_parents(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"cannot write '{path}': '{parent}' is a file")
            return


def image_formats() -> tuple[str, ...]:
    """File extensions matplotlib can save figures as (imports matplotlib, a fraction of a second)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def figure_file(value: str) -> Path:
    """An image file to write, in a format matplotlib supports (from its extension)."""
    path = output_file(value)
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in image_formats():
        what = f"the format {path.suffix!r} is not one matplotlib saves" if suffix else "it has no extension"
        raise argparse.ArgumentTypeError(f"cannot save a figure as '{path}': {what} (it saves "
                                         + ", ".join(f".{f}" for f in image_formats()) + ")")
    return path


def npz_file(value: str) -> Path:
    """A ``.npz`` file to write (numpy archives; :meth:`tracing.causal_trace.FactTrace.load` reads them)."""
    path = output_file(value)
    if path.suffix.lower() != ".npz":
        raise argparse.ArgumentTypeError(f"'{path}' must end in .npz")
    return path


def safetensors_file(value: str) -> Path:
    """A ``.safetensors`` file to write."""
    path = output_file(value)
    if path.suffix.lower() != ".safetensors":
        raise argparse.ArgumentTypeError(f"'{path}' must end in .safetensors")
    return path


def corpus_source(value: str) -> str:
    """MEMIT's C0 corpus: ``model``, ``hf:<dataset>[:<config>]``, or an existing text file or folder."""
    value = text(value).strip()
    if value == "model":
        return value
    if value.startswith("hf:"):
        if not value[3:].strip(":"):
            raise argparse.ArgumentTypeError("'hf:' needs a dataset name, e.g. hf:wikitext:wikitext-103-raw-v1")
        return value
    if not Path(value).expanduser().exists():
        raise argparse.ArgumentTypeError(f"'{value}' is not 'model' or 'hf:<dataset>', and no such file or "
                                         "folder exists")
    return str(Path(value).expanduser())


def add_trace_choices(parser: argparse.ArgumentParser, method_option: str = "--method") -> None:
    """The options that choose how a trace is made (see tracing.causal_trace.TraceConfig)."""
    parser.add_argument(method_option, dest="trace_method", choices=TRACE_METHODS, default="exact",
                        help="exact: restore every cell (ROME); atp: attribution patching, a linear estimate of "
                             "every cell from one backward pass (fast, approximate)")
    parser.add_argument("--atp-steps", type=int, default=1,
                        help="with the atp method: average the gradient over this many noise scales "
                             "(integrated gradients; 1, the default, is plain attribution patching)")
    parser.add_argument("--atp-space", choices=ATP_SPACES, default=ATP_SPACES[0],
                        help="with the atp method: where the estimate is linear: log_odds (default) linearises the "
                             "answer's log-odds and reads the estimate back as a probability; metric linearises "
                             "the metric itself (plain AtP)")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default="gaussian",
                        help="gaussian: noise on the subject's embeddings (ROME, default); symmetric: the subject "
                             "replaced by other bundled subjects of the same token length")
    parser.add_argument("--metric", choices=METRICS, default="prob",
                        help="prob: p(answer) (default); logit_diff: logit(answer) - logit(counterfactual)")


def check_trace_choices(args: argparse.Namespace) -> None:
    """Refuse combinations of the trace options that cannot work, before any model is loaded."""
    if args.atp_steps != 1 and args.trace_method != "atp":
        fail(f"--atp-steps {args.atp_steps} needs --method atp (exact tracing has no gradient to average)")
    if args.atp_space != ATP_SPACES[0] and args.trace_method != "atp":
        fail(f"--atp-space {args.atp_space} needs --method atp (exact tracing estimates nothing)")
    from tracing.attribution import check_steps  # the one definition of valid steps (imports torch)

    try:
        check_steps(args.atp_steps, getattr(args, "direction", "denoising"))
    except ValueError as error:
        fail(f"--atp-steps: {error}")
    if getattr(args, "noise", None) is not None and args.corruption != "gaussian":
        fail(f"--noise sets the Gaussian noise; it has no meaning with --corruption {args.corruption}")


# --- checks after parsing (some need torch or the model) --------------------------------------------------


def check_subject_in_prompt(prompt: str, subject: str) -> None:
    """The subject must occur in the prompt (checked on the strings, before any model is loaded)."""
    if subject.strip() not in prompt:
        fail(f"subject {subject!r} does not occur in prompt {prompt!r}")


def check_model_name(name: str) -> None:
    """The model name resolves (an alias, an ``owner/name`` id, or a folder holding a model)."""
    from tracing.models import UnknownModelError, resolve_model_name

    with user_errors(UnknownModelError):
        resolve_model_name(name)


def check_device(device: str | None) -> None:
    """``device`` names a device torch has here (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or is None: the
    check ``load_model`` makes (:func:`tracing.placement.single_device`), done before the model loads."""
    if device is None:
        return
    import torch

    from tracing.placement import PlacementError, single_device

    try:
        single_device(device, torch.cuda.device_count())
    except PlacementError as error:
        fail(f"--{error}")  # "device '...': ..." as an option


def check_answer(model, answer: str, allow_multi_token: bool, option: str = "--answer") -> None:
    """Refuse an answer that is not one known token: a trace reads the probability of the first token
    only, so several tokens (or an unknown one) would trace something the user did not ask for."""
    from tracing.tokens import target_token_ids, token_strings

    with user_errors(ValueError):
        ids = target_token_ids(model, answer)
    pieces = token_strings(model, ids)
    shown = f"{option} {answer!r} is {len(ids)} token{'s' * (len(ids) > 1)} {pieces}"
    unknown = model.tokenizer.unk_token_id
    if unknown is not None and unknown in ids:
        fail(f"{shown}, including the unknown token {model.tokenizer.unk_token!r}; give an answer the "
             "tokenizer knows")
    if len(ids) > 1 and not allow_multi_token:
        fail(f"{shown}; a trace reads p({pieces[0]!r}), its first token, only. Give a one-token answer, or pass "
             "--allow-multi-token-answer to trace the first token anyway")


def facts_from(source: Path | str | None) -> list:
    """The facts of a dataset given on the command line (a file, or a name such as ``counterfact``, downloaded
    once into the cache), or the bundled known facts."""
    from tracing.datasets import DatasetUnavailableError, load_dataset
    from tracing.facts import known_facts

    if source is None:
        return known_facts()
    try:
        facts = load_dataset(source)
    except DatasetUnavailableError as error:
        fail(error)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail(f"cannot read facts from '{source}': {type(error).__name__}: {error}")
    if not facts:
        fail(f"'{source}' holds no facts")
    return facts


# --- parsers of commands whose modules import torch at the top (they parse first, see their __main__) ----


def locate_parser() -> ArgumentParser:
    """``python -m tracing.locate``."""
    parser = ArgumentParser(prog="python -m tracing.locate",
                            description="Locate where a model stores facts: trace known facts, average the "
                                        "indirect effects, and choose the critical MLP layers MEMIT edits.")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, type=text,
                        help=f"model name or folder (default: the embedded {DEFAULT_MODEL})")
    parser.add_argument("--facts", type=int_at_least(1), default=40, help="how many facts to trace (default 40)")
    parser.add_argument("--facts-file", default=None, type=facts_source,
                        help="a dataset name (counterfact, zsre, mquake, knowedit-*, ...) or a CounterFact, zsRE, "
                             "MQuAKE or KnowEdit JSON file, instead of the bundled known facts")
    parser.add_argument("--kinds", default=("mlp",), type=kind_list,
                        help="comma-separated kinds (resid, mlp, attn), or 'all'; mlp is always traced")
    parser.add_argument("--samples", type=int_at_least(1), default=10, help="noise samples per cell (default 10)")
    parser.add_argument("--size", type=int_at_least(1), default=None,
                        help="number of critical layers (default 5, or every layer of a smaller model)")
    parser.add_argument("--method", choices=SELECTION_METHODS, default="peak-end",
                        help="how the layers are chosen from the MLP curve (default peak-end)")
    add_trace_choices(parser, "--trace-method")  # --method already chooses the layers
    parser.add_argument("--fact-batch", type=int_at_least(1), default=8,
                        help="facts per forward and backward of the atp scan (default 8; exact tracing goes one "
                             "fact at a time)")
    parser.add_argument("--figures", default=None, type=output_folder,
                        help="folder for the average-effect and layer figures")
    parser.add_argument("--include-wrong", action="store_true",
                        help="average over facts the model gets wrong too (ROME leaves them out)")
    parser.add_argument("--save-package", action="store_true",
                        help="also write the result into tracing/data (maintainers, for the embedded model)")
    parser.add_argument("--device", default=None, type=text, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser
