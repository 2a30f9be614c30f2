"""README figure: causal trace of "The Eiffel Tower is located in the city of" on the embedded model.

    python -m figures.trace_eiffel [--out docs/eiffel_smollm2.png]
"""

from __future__ import annotations

import argparse

from tracing.causal_trace import TraceConfig, trace_prompt
from tracing.models import load_model
from tracing.plot import plot_trace, save_figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/eiffel_smollm2.png")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    trace = trace_prompt(model, "The Eiffel Tower is located in the city of", "Eiffel Tower", config=TraceConfig())
    print(save_figure(plot_trace(trace), args.out))


if __name__ == "__main__":
    main()
