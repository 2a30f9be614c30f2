"""README figure: MEMIT quality against the number of facts edited at once, on the embedded model.

    python -m figures.memit_scaling [--results benchmarks/results/memit_scale.json] [--out docs/memit_scaling.png]

Reads the results of ``benchmarks/memit_scale.py`` (run it first: about an hour on 2 CPU cores for
1, 10, 100 and 1000 edits). Dashed lines are the unedited model's values.
"""

from __future__ import annotations

import json
from pathlib import Path

from tracing import cli

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "memit_scale.json"


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m figures.memit_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), type=cli.existing_file,
                        help="results of benchmarks/memit_scale.py (default: the committed ones)")
    parser.add_argument("--out", default="docs/memit_scaling.png", type=cli.figure_file,
                        help="output image (default docs/memit_scaling.png)")
    args = parser.parse_args(argv)
    try:
        runs = json.loads(args.results.read_text())
        after = {run["n_edits"]: run["after"] for run in runs}
        # the unedited model's neighbourhood score, averaged over the runs' fact sets
        baseline = {"NS": sum(run["before"]["NS"] for run in runs) / len(runs)}
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as error:
        cli.fail(f"'{args.results}' is not a memit_scale.py result list ({type(error).__name__}: {error})")

    from editing.evaluate import plot_metrics_vs_edits
    from tracing.plot import save_figure

    fig = plot_metrics_vs_edits(after, ["ES", "PS", "NS", "score"], baseline,
                                title="MEMIT on SmolLM2-135M (CounterFact metrics)")
    print(save_figure(fig, args.out))


if __name__ == "__main__":
    main()
