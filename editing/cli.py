"""The argument parsers of ``python -m editing.memit``, ``editing.key_stats`` and ``editing.evaluate``, in a
module that imports nothing heavy, so that ``--help`` and refusals of bad arguments answer before torch is
imported (see :mod:`tracing.cli`)."""

from __future__ import annotations

import argparse

from tracing import cli


def memit_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m editing.memit",
        description="Edit facts into a model with MEMIT (Meng et al., ICLR 2023), evaluate the model on "
                    "CounterFact's metrics before and after, and write the table. The first edit of a model "
                    "also samples a corpus from it and measures MEMIT's key statistics (C0); they are cached.",
    )
    parser.add_argument("model", nargs="?", default=cli.DEFAULT_MODEL, type=cli.text,
                        help=f"model name or folder (default: the embedded {cli.DEFAULT_MODEL})")
    parser.add_argument("--facts", default=None, type=cli.facts_source,
                        help="the edits: a dataset name (counterfact, zsre, mquake, knowedit-*, ...), downloaded once "
                             "into the cache, or a CounterFact, zsRE, MQuAKE or KnowEdit JSON file (default: the "
                             "bundled known facts)")
    parser.add_argument("-n", "--n-edits", type=cli.int_at_least(1), default=100,
                        help="how many facts to edit at once, one per subject (default 100)")
    parser.add_argument("--layers", default=None, type=cli.layer_list,
                        help="comma-separated layers to edit (default: the critical layers tracing found)")
    parser.add_argument("--mom2-weight", type=cli.float_above(0, inclusive=False), default=None,
                        help="λ, the weight of the key statistics (default: GPT-J's 15000 scaled by d_mlp)")
    parser.add_argument("--corpus", default="model", type=cli.corpus_source,
                        help="C0 corpus: 'model' (text sampled from the model), a text file or folder, "
                             "or hf:<dataset>[:<config>] (default: model)")
    parser.add_argument("--corpus-samples", type=cli.int_at_least(1), default=1000,
                        help="texts in the C0 corpus (default 1000)")
    parser.add_argument("--corpus-tokens", type=cli.int_at_least(1), default=None,
                        help="stop the C0 corpus after this many tokens (default: no budget)")
    parser.add_argument("--key-stats", nargs="+", default=[], type=cli.existing_file, metavar="FILE",
                        help="C0 files written by python -m editing.key_stats (one per layer), used instead of "
                             "measuring; a file of another model or layer is refused")
    parser.add_argument("--generation-cases", type=cli.int_at_least(0), default=0,
                        help="edited facts whose generations are scored for GE (default 0: no GE)")
    parser.add_argument("--out-dir", default="out/memit", type=cli.output_folder,
                        help="where memit_eval.md and memit_eval.json are written (default out/memit)")
    parser.add_argument("--save-edit", default=None, type=cli.safetensors_file,
                        help="also save the edit to this .safetensors file (editing.weights.WeightEdit.load)")
    parser.add_argument("--device", default=None, type=cli.text, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                        help="run the target vectors' optimisation under autocast (bfloat16: 1.9x faster on CPUs "
                             "with bf16 units, many times slower on CPUs without, where it warns; "
                             "docs/memit_speed.md); default: the model's dtype")
    return parser


def key_stats_parser() -> cli.ArgumentParser:
    """``python -m editing.key_stats``."""
    parser = cli.ArgumentParser(
        prog="python -m editing.key_stats",
        description="Measure MEMIT's key statistics C0 = E[k kT] of MLP layers over a corpus and cache them in "
                    "files that describe themselves. Resumes an interrupted run from its last checkpoint; "
                    "under torchrun the corpus is sharded over the processes and the sums all-reduced.",
    )
    parser.add_argument("model", nargs="?", default=cli.DEFAULT_MODEL, type=cli.text,
                        help=f"model name or folder (default: the embedded {cli.DEFAULT_MODEL})")
    parser.add_argument("--layers", default=None, type=cli.layer_list,
                        help="comma-separated layers (default: the critical layers tracing found)")
    parser.add_argument("--corpus", default="model", type=cli.corpus_source,
                        help="'model' (text sampled from the model), a text file or folder, or "
                             "hf:<dataset>[:<config>] (default: model)")
    parser.add_argument("--samples", type=cli.int_at_least(1), default=1000, help="texts at most (default 1000)")
    parser.add_argument("--max-tokens", type=cli.int_at_least(1), default=64,
                        help="tokens kept of each text (default 64)")
    parser.add_argument("--token-budget", type=cli.int_at_least(1), default=None,
                        help="tokens in all; the stream stops there (default: no budget)")
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=32, help="texts per batch (default 32)")
    parser.add_argument("--checkpoint-every", type=cli.int_at_least(0), default=50,
                        help="batches between checkpoints (default 50; 0: none)")
    parser.add_argument("--out", default=None, type=cli.output_folder,
                        help="also copy the statistics files into this folder, to share them")
    parser.add_argument("--device", default=None, type=cli.text, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


# Copies of editing.editor.methods(), editing.scoring.SCORINGS and editing.protocol.PROTOCOLS, which cannot be
# imported without torch (tests/test_bad_inputs.py checks that they agree).
EDIT_METHODS = ("alphaedit", "grace", "memit", "rome", "subject-memory", "wise", "wise-easyedit")
SCORINGS = ("probability", "token", "generated")
PROTOCOLS = ("after_all", "after_each")
DATASETS = ("known",)  # names --dataset accepts besides a file


def scoring_list(value: str) -> tuple[str, ...]:
    """Comma-separated scorings (probability, token, generated), or ``all``."""
    return cli.choice_list(value, SCORINGS, "scorings")


def dataset_source(value: str) -> str:
    """``known`` (:data:`DATASETS`), a registered dataset name (counterfact, zsre, ...) or an existing file."""
    value = cli.text(value).strip()
    return value if value in DATASETS else str(cli.facts_source(value))


def config_override(value: str) -> tuple[str, object]:
    """``FIELD=VALUE`` with a Python literal value (numbers, tuples, quoted strings, True/None): the one
    parser of every ``--set`` (``editing.evaluate``, ``benchmarks/lifelong.py``, ``wise_routing.py``), so a
    typo like ``layer=two`` is refused instead of becoming the text "two"."""
    import ast

    field, sep, literal = value.partition("=")
    if not sep or not field.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. n_iter=30, got {value!r}")
    try:
        return field.strip(), ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{value!r}: the value must be a Python literal (quote strings: "
                                         f"{field.strip()}='text')") from None


def evaluate_parser() -> cli.ArgumentParser:
    """``python -m editing.evaluate``."""
    parser = cli.ArgumentParser(
        prog="python -m editing.evaluate",
        description="Edit N facts with one method (all at once, or sequentially in calls of --batch) and score "
                    "the model before and after with three scorings side by side: probability comparison "
                    "(CounterFact ES/PS/NS), teacher-forced token accuracy (zsRE/WISE Rel/Gen/Loc) and generated "
                    "answers (greedy, no teacher forcing). Writes evaluate_METHOD.md, .json and .png.",
    )
    parser.add_argument("method", choices=EDIT_METHODS, help="the editing method")
    parser.add_argument("--dataset", default="known", type=dataset_source,
                        help="'known' (the bundled known facts, default), a dataset name (counterfact, zsre, mquake, "
                             "knowedit-*, ...; downloaded once) or a JSON file of those shapes")
    parser.add_argument("-n", "--n-edits", type=cli.int_at_least(1), default=10,
                        help="how many facts to edit, one per subject, spread over the dataset (default 10); on "
                             "MQuAKE data, how many cases (each with all its rewrites)")
    parser.add_argument("--sequential", action="store_true",
                        help="edit in consecutive calls of --batch facts instead of one call of all N")
    parser.add_argument("--batch", type=cli.int_at_least(1), default=None,
                        help="facts per call with --sequential (default 1); on MQuAKE data, whole cases per call")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="after_all",
                        help="after_all: score every fact after the last call (default); after_each: score each "
                             "call's facts right after it (needs --sequential)")
    parser.add_argument("--scoring", default=SCORINGS, type=scoring_list,
                        help="comma-separated scorings from probability, token, generated, or 'all' (default all)")
    parser.add_argument("--generation-cases", type=cli.int_at_least(0), default=0,
                        help="edited facts whose sampled generations are scored for fluency GE, with the "
                             "probability scoring (default 0: no GE)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=config_override,
                        metavar="FIELD=VALUE", help="override a field of the method's config, e.g. --set n_iter=30 "
                                                    "(repeatable)")
    parser.add_argument("--model", default=cli.DEFAULT_MODEL, type=cli.text,
                        help=f"model name or folder (default: the embedded {cli.DEFAULT_MODEL})")
    parser.add_argument("--out-dir", default="out/evaluate", type=cli.output_folder,
                        help="where evaluate_METHOD.md, .json and .png are written (default out/evaluate)")
    parser.add_argument("--device", default=None, type=cli.text, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def parse_evaluate_args(argv: list[str] | None = None):
    """Parse and cross-check the arguments of ``python -m editing.evaluate`` (nothing heavy imported)."""
    args = evaluate_parser().parse_args(argv)
    if not args.sequential and args.batch is not None:
        cli.fail("--batch sets the facts per call of a --sequential run; add --sequential")
    if not args.sequential and args.protocol == "after_each":
        cli.fail("--protocol after_each scores each call of a --sequential run; add --sequential")
    if args.generation_cases and "probability" not in args.scoring:
        cli.fail("--generation-cases adds GE to the probability scoring; include it in --scoring")
    if args.generation_cases > args.n_edits:
        cli.fail(f"--generation-cases {args.generation_cases} is more than the {args.n_edits} edited facts")
    args.batch = (args.batch or 1) if args.sequential else args.n_edits
    return args
