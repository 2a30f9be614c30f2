"""README figure: lifelong editing metrics against the number of sequential edits T, one line per method.

    python -m figures.lifelong [--results benchmarks/results/lifelong.jsonl] [--out docs/lifelong.png]
                               [--protocol after_all] [--batch 10]

Reads the rows ``benchmarks/lifelong.py`` appends (one panel per metric: reliability, generalization,
locality, unrelated); a method measured more than once at the same T shows its latest row. Rows of
other protocols or call sizes are left out, so every line was measured the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracing import cli

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "lifelong.jsonl"
METRICS = ("reliability", "generalization", "locality", "unrelated")


MARKERS = ("o", "s", "^")

def series(rows: list[dict], protocol: str, batch: int) -> dict[str, dict[int, dict]]:
    """{line label: {T: row}} for the rows of one protocol and call size (later rows win)."""
    lines: dict[str, dict[int, dict]] = {}
    for row in rows:
        if row.get("protocol") != protocol or row.get("batch") != batch:
            continue
        settings = ", ".join(f"{k}={v}" for k, v in sorted(row.get("config", {}).items()))
        label = row["method"] + (f" ({settings})" if settings else "")
        lines.setdefault(label, {})[int(row["T"])] = row
    return lines


def plot_lifelong(lines: dict[str, dict[int, dict]], title: str):
    import matplotlib.pyplot as plt

    from tracing.plot import STYLE

    with plt.rc_context(STYLE):
        n_rows = (len(lines) + 1) // 2
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.0 + 0.25 * n_rows), sharey=True)
        for ax, metric in zip(axes, METRICS):
            for i, (label, by_t) in enumerate(sorted(lines.items())):
                ts = sorted(t for t, row in by_t.items() if row.get(metric) is not None)
                ax.plot(ts, [by_t[t][metric] for t in ts], marker=MARKERS[i // 10 % len(MARKERS)],
                        color=f"C{i % 10}", label=label)  # colour and marker together tell up to 30 lines apart
            ax.set_xscale("log")
            ax.set_xlabel("sequential edits T")
            ax.set_title(metric)
            ax.set_ylim(-0.02, 1.02)
        handles, labels = axes[0].get_legend_handles_labels()
        rows = (len(labels) + 1) // 2
        fig.legend(handles, labels, frameon=False, fontsize=7, loc="lower center", ncol=2)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))  # the legend below the panels, never over a line
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m figures.lifelong", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), type=cli.existing_file,
                        help="rows of benchmarks/lifelong.py (default: the committed ones)")
    parser.add_argument("--out", default="docs/lifelong.png", type=cli.figure_file,
                        help="output image (default docs/lifelong.png)")
    parser.add_argument("--protocol", default="after_all", choices=("after_all", "after_each"))
    parser.add_argument("--batch", default=10, type=cli.int_at_least(1), help="facts per edit call (default 10)")
    args = parser.parse_args(argv)
    try:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        lines = series(rows, args.protocol, args.batch)
    except (ValueError, KeyError, TypeError) as error:
        cli.fail(f"'{args.results}' is not a file of lifelong.py rows ({type(error).__name__}: {error})")
    if not lines:
        cli.fail(f"no rows with protocol {args.protocol} and batch {args.batch} in '{args.results}'")

    from tracing.plot import save_figure

    fig = plot_lifelong(lines, f"Lifelong editing on SmolLM2-135M, calls of {args.batch}, scored {args.protocol}")
    print(save_figure(fig, args.out))


if __name__ == "__main__":
    main()
