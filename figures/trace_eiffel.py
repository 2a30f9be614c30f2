"""README figure: causal trace of "The Eiffel Tower is located in the city of" on the embedded model.

    python -m figures.trace_eiffel [--out docs/eiffel_smollm2.png]
"""

from __future__ import annotations

from tracing import cli

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m figures.trace_eiffel", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/eiffel_smollm2.png", type=cli.figure_file,
                        help="output image (default docs/eiffel_smollm2.png)")
    parser.add_argument("--model", default=cli.DEFAULT_MODEL, type=cli.text, help="model name or folder")
    args = parser.parse_args(argv)
    cli.check_model_name(args.model)

    from tracing.causal_trace import TraceConfig, trace_prompt
    from tracing.models import ModelUnavailableError, load_model
    from tracing.plot import plot_trace, save_figure

    with cli.user_errors(ModelUnavailableError):
        model = load_model(args.model)
    trace = trace_prompt(model, PROMPT, SUBJECT, config=TraceConfig())
    print(save_figure(plot_trace(trace), args.out))


if __name__ == "__main__":
    main()
