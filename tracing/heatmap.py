"""Command line: draw ROME-style causal-tracing heatmaps for one prompt.

    python -m tracing.heatmap                       # embedded SmolLM2, "The Eiffel Tower ..." example
    python -m tracing.heatmap gpt-j --prompt "Steve Jobs was the founder of" --subject "Steve Jobs"
    python -m tracing.heatmap --kind mlp --out mlp.png --save-trace eiffel.npz
    python -m tracing.heatmap --method atp                      # attribution patching: seconds, approximate
    python -m tracing.heatmap --corruption symmetric --metric logit_diff --counterfactual Rome
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tracing import cli

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_SUBJECT = "Eiffel Tower"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m tracing.heatmap",
        description="Causal tracing heatmaps (Meng et al. 2022) for one prompt.",
    )
    parser.add_argument("model", nargs="?", default=cli.DEFAULT_MODEL, type=cli.text,
                        help=f"model name (default: the embedded {cli.DEFAULT_MODEL}; e.g. gpt2-xl, gpt-j, "
                             "owner/name, or a folder written by save_pretrained)")
    parser.add_argument("--prompt", default=None, type=cli.text, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--subject", default=None, type=cli.text,
                        help=f"subject inside the prompt whose tokens are corrupted (default: {DEFAULT_SUBJECT!r})")
    parser.add_argument("--answer", default=None, type=cli.text,
                        help="answer to trace, one token (default: the model's top-1 prediction)")
    parser.add_argument("--allow-multi-token-answer", action="store_true",
                        help="trace the first token of an --answer that is several tokens instead of refusing it")
    parser.add_argument("--kind", choices=[*cli.KINDS, "all"], default="all", help="which states to restore")
    parser.add_argument("--out", default=None, type=cli.figure_file,
                        help="output image (.png/.pdf/.svg/...; default heatmap_<model>.png)")
    parser.add_argument("--save-trace", default=None, type=cli.npz_file, help="also save the numbers as .npz")
    parser.add_argument("--samples", type=cli.int_at_least(1), default=10, help="noise samples per cell (default 10)")
    parser.add_argument("--noise", type=cli.float_above(0), default=None,
                        help="absolute noise std (default: 3 x std of subject token embeddings)")
    parser.add_argument("--window", type=cli.int_at_least(1), default=10,
                        help="layers restored together for mlp/attn (default 10)")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=1, help="noise seed (default 1)")
    parser.add_argument("--engine", choices=["fast", "reference"], default="fast",
                        help="reference = one forward per cell, as kmeng01/rome (slow)")
    cli.add_trace_choices(parser)
    parser.add_argument("--counterfactual", default=None, type=cli.text,
                        help="the other answer of --metric logit_diff (one token; needed there)")
    parser.add_argument("--direction", choices=cli.DIRECTIONS, default="denoising",
                        help="denoising: restore clean states in the corrupted run (ROME, default); noising: "
                             "corrupt one state of the clean run (exact noising uses the reference engine)")
    parser.add_argument("--device", default=None, type=cli.text,
                        help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is not None and args.subject is None:
        cli.fail("--prompt needs --subject (the part of the prompt to corrupt)")
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    subject = DEFAULT_SUBJECT if args.subject is None else args.subject
    cli.check_subject_in_prompt(prompt, subject)
    out = args.out or Path(f"heatmap_{args.model.replace('/', '_')}.png")
    if args.save_trace is not None and args.save_trace.resolve() == out.resolve():
        cli.fail(f"--save-trace and --out are the same file '{out}'")
    kinds = cli.KINDS if args.kind == "all" else (args.kind,)
    cli.check_trace_choices(args)
    if args.metric == "logit_diff" and args.counterfactual is None:
        cli.fail("--metric logit_diff needs --counterfactual (the answer to compare against)")
    if args.metric != "logit_diff" and args.counterfactual is not None:
        cli.fail(f"--counterfactual is only used with --metric logit_diff, not --metric {args.metric}")
    if args.counterfactual is not None and args.answer is not None and args.counterfactual.strip() == args.answer.strip():
        cli.fail(f"--counterfactual {args.counterfactual!r} is the traced --answer; logit_diff needs a different one")
    cli.check_model_name(args.model)
    cli.check_device(args.device)

    from tracing.causal_trace import TraceConfig, trace_prompt
    from tracing.models import ModelUnavailableError, UnknownModelError, load_model
    from tracing.plot import plot_trace, save_figure

    config = TraceConfig(kinds=kinds, samples=args.samples, noise=args.noise, window=args.window,
                         seed=args.seed, engine=args.engine, method=args.trace_method, corruption=args.corruption,
                         metric=args.metric, direction=args.direction, atp_steps=args.atp_steps,
                         atp_space=args.atp_space)
    started = time.perf_counter()
    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=args.device)
    loaded = time.perf_counter()
    if args.answer is not None:
        cli.check_answer(model, args.answer, args.allow_multi_token_answer)
    if args.counterfactual is not None:
        cli.check_answer(model, args.counterfactual, args.allow_multi_token_answer, "--counterfactual")
    # SubjectNotFoundError: no token covers the subject; NoReplacementError: no subject of equal length;
    # a counterfactual that starts with the answer's token
    with cli.user_errors(ValueError):
        trace = trace_prompt(model, prompt, subject, answer=args.answer, counterfactual=args.counterfactual,
                             config=config)
    traced = time.perf_counter()

    save_figure(plot_trace(trace), out)
    if args.save_trace:
        trace.save(args.save_trace)
    _print_summary(trace, out, loaded - started, traced - loaded)
    return 0


def _print_summary(trace, out: Path, load_seconds: float, trace_seconds: float) -> None:
    from tracing.plot import describe_trace

    short = "p" if trace.metric == "prob" else "logit diff"
    print(f"model        {trace.model_name} (loaded in {load_seconds:.1f}s)")
    print(f"prompt       {trace.prompt!r}, subject {trace.subject!r} = tokens {trace.subject_range}")
    print(f"answer       {trace.answer.strip()!r}: clean {short}={trace.clean_prob:.3f}, "
          f"corrupted {short}={trace.corrupted_prob:.3f} (noise std {trace.noise:.3f}, {trace.samples} samples)")
    print(f"how          {describe_trace(trace)}")
    if trace.replacements:
        print(f"replacements {', '.join(trace.replacements)}")
    verb = "corrupt" if trace.direction == "noising" else "restore"
    for kind in trace.kinds:
        effect = trace.indirect_effect(kind)
        t, l = divmod(int(effect.argmax()), effect.shape[1])
        print(f"{kind:<12} strongest {verb}: token {t} {trace.tokens[t]!r}, layer {l}, "
              f"{short}={trace.scores[kind][t, l]:.3f} (indirect effect {effect[t, l]:+.3f})")
    print(f"traced in {trace_seconds:.1f}s -> {out}")


if __name__ == "__main__":
    sys.exit(main())
