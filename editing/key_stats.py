"""Measure MEMIT's key statistics C0 from the command line, alone or sharded over processes.

    python -m editing.key_stats smollm2 --layers 1,2,3,4,5 --corpus texts/ --token-budget 2000000
    torchrun --nproc-per-node 4 -m editing.key_stats gpt-j --layers 3,4,5,6,7,8 --corpus hf:wikitext:wikitext-103-raw-v1

The statistics land in the cache, where MEMIT finds them for the same corpus settings; ``--out`` also
copies the files (which describe themselves, :mod:`editing.stats_file`) to a folder to share them, and
``python -m editing.memit --key-stats FILE...`` or ``MemitConfig(key_stats=...)`` loads them from a path.
Killed and run again with the same arguments, it resumes from its last checkpoint.
"""

from __future__ import annotations

import shutil
import sys

if __name__ == "__main__":  # answer --help and refuse bad arguments before torch is imported
    from editing.cli import key_stats_parser

    key_stats_parser().parse_args()


def main(argv: list[str] | None = None) -> int:
    from editing.cli import key_stats_parser
    from editing.covariance import CorpusConfig, key_second_moments, stats_path
    from editing.memit import MemitConfig
    from editing.stats_file import StatsMismatchError, read_key_stats
    from tracing import cli
    from tracing.distributed import init_from_environment, local_device
    from tracing.io import atomic_path
    from tracing.models import ModelUnavailableError, UnknownModelError, load_model

    args = key_stats_parser().parse_args(argv)
    cli.check_model_name(args.model)
    cli.check_device(args.device)
    current = init_from_environment()
    corpus = CorpusConfig(source=args.corpus, samples=args.samples, max_tokens=args.max_tokens,
                          token_budget=args.token_budget, batch_size=args.batch_size,
                          checkpoint_every=args.checkpoint_every)
    device = args.device or (local_device() if current.size > 1 else None)
    with cli.user_errors(UnknownModelError, ModelUnavailableError):
        model = load_model(args.model, device=device)
    with cli.user_errors(ValueError):
        layers = MemitConfig(layers=args.layers).resolved_layers(model)
    with cli.user_errors(ModelUnavailableError, ValueError, FileNotFoundError):
        key_second_moments(model, layers, corpus, show_progress=current.is_main)
    if not current.is_main:
        return 0
    for layer in layers:
        path = stats_path(model, layer, corpus)
        try:
            print(f"{path}: {read_key_stats(path)[1].describe()}")
        except StatsMismatchError:  # cached by a version before files described themselves
            print(f"{path}: cached without a description; delete it and run again to share it")
            continue
        if args.out:
            shared = args.out / f"{path.parent.parent.name}_{path.parent.name}_{path.name}"
            with atomic_path(shared) as tmp:
                shutil.copyfile(path, tmp)
            print(f"copied to {shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
