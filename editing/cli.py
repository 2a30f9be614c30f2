"""The argument parser of ``python -m editing.memit``, in a module that imports nothing heavy, so that
``--help`` and refusals of bad arguments answer before torch is imported (see :mod:`tracing.cli`)."""

from __future__ import annotations

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
