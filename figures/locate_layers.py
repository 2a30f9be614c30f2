"""README figure: average indirect effect of MLP restorations over the bundled known facts, and the
critical layers MEMIT edits by default.

    python -m figures.locate_layers [--facts 48] [--out-dir docs]

Writes ``average_smollm2.png`` and ``critical_layers_smollm2.png`` (about 15 minutes on 2 CPU cores) and
refreshes the cached critical-layer choice. ``python -m tracing.locate --save-package`` is the same run
that also updates the choice shipped in ``tracing/data``.
"""

from __future__ import annotations

from tracing import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m figures.locate_layers", description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=cli.int_at_least(1), default=48, help="how many facts to trace (default 48)")
    parser.add_argument("--kinds", default=("mlp",), type=cli.kind_list, help="comma-separated kinds, or 'all'")
    parser.add_argument("--out-dir", default="docs", type=cli.output_folder, help="folder for the figures (default docs)")
    parser.add_argument("--model", default=cli.DEFAULT_MODEL, type=cli.text, help="model name or folder")
    parser.add_argument("--include-wrong", action="store_true", help="average over wrongly predicted facts too")
    args = parser.parse_args(argv)

    from tracing.locate import main as locate_main

    return locate_main([args.model, "--facts", str(args.facts), "--kinds", ",".join(args.kinds),
                        "--figures", str(args.out_dir)] + ["--include-wrong"] * args.include_wrong)


if __name__ == "__main__":
    raise SystemExit(main())
