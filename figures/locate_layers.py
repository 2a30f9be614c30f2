"""README figure: average indirect effect of MLP restorations over the bundled known facts, and the
critical layers MEMIT edits by default.

    python -m figures.locate_layers [--facts 48] [--out-dir docs]

Writes ``average_smollm2.png`` and ``critical_layers_smollm2.png`` (about 15 minutes on 2 CPU cores) and
refreshes the cached critical-layer choice. ``python -m tracing.locate --save-package`` is the same run
that also updates the choice shipped in ``tracing/data``.
"""

from __future__ import annotations

import argparse

from tracing.locate import main as locate_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=48)
    parser.add_argument("--kinds", default="mlp", help="comma-separated kinds, or 'all'")
    parser.add_argument("--out-dir", default="docs")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--include-wrong", action="store_true", help="average over wrongly predicted facts too")
    args = parser.parse_args(argv)
    return locate_main([args.model, "--facts", str(args.facts), "--kinds", args.kinds, "--figures", args.out_dir]
                       + ["--include-wrong"] * args.include_wrong)


if __name__ == "__main__":
    raise SystemExit(main())
