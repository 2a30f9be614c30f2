"""Command line: draw ROME-style causal-tracing heatmaps for one prompt.

    python -m tracing.heatmap                       # embedded SmolLM2, "The Eiffel Tower ..." example
    python -m tracing.heatmap gpt-j --prompt "Steve Jobs was the founder of" --subject "Steve Jobs"
    python -m tracing.heatmap --kind mlp --out mlp.png --save-trace eiffel.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tracing.adapter import KINDS
from tracing.models import EMBEDDED_MODEL, ModelUnavailableError, UnknownModelError

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_SUBJECT = "Eiffel Tower"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tracing.heatmap",
        description="Causal tracing heatmaps (Meng et al. 2022) for one prompt.",
    )
    parser.add_argument("model", nargs="?", default=EMBEDDED_MODEL,
                        help=f"model name (default: the embedded {EMBEDDED_MODEL}; e.g. gpt2-xl, gpt-j, owner/name)")
    parser.add_argument("--prompt", default=None, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--subject", default=None, help="subject inside the prompt whose tokens are corrupted")
    parser.add_argument("--answer", default=None, help="answer to trace (default: the model's top-1 prediction)")
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="which states to restore")
    parser.add_argument("--out", default=None, help="output image (.png/.pdf/.svg; default heatmap_<model>.png)")
    parser.add_argument("--save-trace", default=None, help="also save the numbers as .npz")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per cell (default 10)")
    parser.add_argument("--noise", type=float, default=None,
                        help="absolute noise std (default: 3 x std of subject token embeddings)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn")
    parser.add_argument("--seed", type=int, default=1, help="noise seed")
    parser.add_argument("--engine", choices=["fast", "reference"], default="fast",
                        help="reference = one forward per cell, as kmeng01/rome (slow)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt is not None and args.subject is None:
        print("error: --prompt needs --subject (the part of the prompt to corrupt)", file=sys.stderr)
        return 2
    prompt = args.prompt or DEFAULT_PROMPT
    subject = args.subject or DEFAULT_SUBJECT
    kinds = tuple(KINDS) if args.kind == "all" else (args.kind,)

    from tracing.causal_trace import TraceConfig, trace_prompt
    from tracing.models import load_model
    from tracing.plot import plot_trace, save_figure
    from tracing.tokens import SubjectNotFoundError

    if subject.strip() not in prompt:
        print(f"error: subject {subject!r} does not occur in prompt {prompt!r}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        model = load_model(args.model, device=args.device)
    except (UnknownModelError, ModelUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    config = TraceConfig(kinds=kinds, samples=args.samples, noise=args.noise, window=args.window,
                         seed=args.seed, engine=args.engine)
    try:
        trace = trace_prompt(model, prompt, subject, answer=args.answer, config=config)
    except (SubjectNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    traced = time.perf_counter()

    out = Path(args.out or f"heatmap_{args.model.replace('/', '_')}.png")
    save_figure(plot_trace(trace), out)
    if args.save_trace:
        trace.save(args.save_trace)
    _print_summary(trace, out, loaded - started, traced - loaded)
    return 0


def _print_summary(trace, out: Path, load_seconds: float, trace_seconds: float) -> None:
    print(f"model        {trace.model_name} (loaded in {load_seconds:.1f}s)")
    print(f"prompt       {trace.prompt!r}, subject {trace.subject!r} = tokens {trace.subject_range}")
    print(f"answer       {trace.answer.strip()!r}: clean p={trace.clean_prob:.3f}, "
          f"corrupted p={trace.corrupted_prob:.3f} (noise std {trace.noise:.3f}, {trace.samples} samples)")
    for kind in trace.kinds:
        effect = trace.indirect_effect(kind)
        t, l = divmod(int(effect.argmax()), effect.shape[1])
        print(f"{kind:<12} strongest restore: token {t} {trace.tokens[t]!r}, layer {l}, "
              f"p={trace.scores[kind][t, l]:.3f} (indirect effect {effect[t, l]:+.3f})")
    print(f"traced in {trace_seconds:.1f}s -> {out}")


if __name__ == "__main__":
    sys.exit(main())
