"""How MEMIT's CounterFact scores depend on the number of texts C0 is measured on (issue 16, item 3).

    python benchmarks/c0_samples.py [--model smollm2] [-n 100] [--samples 100,300,1000,3000,10000]
                                    [--corpus model] [--threads T] [--out benchmarks/results/c0_samples.json]

The N facts are the ones ``python -m editing.memit -n N`` edits (the bundled known facts, one per subject,
spread over the relations), at MEMIT's default layers and λ. The target vectors z, most of an edit's time,
do not depend on C0, so they are optimised once. Then, for each sample count S in ascending order, C0 is
summed over the first S texts of one corpus (one pass: each count's sums are carried into the next, so the
smaller counts are prefixes of the larger ones and cost nothing extra), MEMIT's update is solved with it,
ES/PS/NS are scored on the edited facts, and the weights are restored bit for bit (checked) before the next
count. The JSON is rewritten atomically after every count, so a killed run keeps the counts it finished.
``c0_seconds`` of a count is the time spent summing its first S texts (what measuring C0 on S texts costs).

Corpus: MEMIT's default, text sampled from the model (64 tokens per text, seed 0). The package ships the
embedded model's draw of 1000 texts; a larger count samples a draw of max(--samples) texts once (with a
progress bar; about 8.5 minutes per 1000 texts on the Intel 2-core machine, 13 on the AMD one: 10,000 texts
in 2 h 11 min on two threads) and caches it, so a second run reads it; a killed draw resumes after its last
batch (editing.sampling_checkpoint). The
draw's texts are sampled in batches of 64 under one seed, so its first S texts are those of the S-text draw
that ``CorpusConfig(samples=S)`` reads, except the S-text draw's last partial batch. ``--corpus DIR|FILE|hf:NAME``
measures on another source; one holding fewer texts than asked stops at the texts it has (recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from editing.memit import MemitConfig
    from tracing.facts import Fact

DEFAULT_OUT = Path(__file__).parent / "results" / "c0_samples.json"
DEFAULT_SAMPLES = "100,300,1000,3000,10000"
COLUMNS = ("samples", "tokens", "c0_seconds", "ES", "PS", "NS", "score")


def sweep(model, facts: Sequence[Fact], counts: Sequence[int], config: MemitConfig, out: Path, *, model_name: str,
          threads: int) -> dict:
    """Edit ``facts`` once per count with C0 from the first ``count`` texts of ``config.corpus`` (z computed
    once), score them, restore the weights, and write the growing record to ``out`` after every count."""
    import torch

    from editing.covariance import CorpusConfig, corpus_id, corpus_texts, packaged_corpus_path, prefix_key_stats
    from editing.evaluate import evaluate_counterfact
    from editing.memit import apply_memit, memit_targets
    from tracing.adapter import ModelAdapter
    from tracing.io import write_json_atomic

    counts = sorted(set(counts))
    layers = config.resolved_layers(model)
    corpus = dataclasses.replace(config.corpus, samples=counts[-1])
    default = dataclasses.replace(config.corpus, samples=CorpusConfig().samples)
    if corpus.source == "model" and counts[-1] <= default.samples and packaged_corpus_path(model, default).is_file():
        corpus = default  # the packaged draw holds enough: its prefixes, nothing sampled
    record: dict = {
        "model": model_name, "facts": len(facts), "layers": list(layers),
        "mom2_weight": config.resolved_mom2_weight(model), "threads": threads,
        "corpus": {"source": corpus.source, "id": corpus_id(corpus), "max_tokens": corpus.max_tokens,
                   "asked": counts[-1]},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": list(os.getloadavg()), "rows": [],
    }
    if corpus.source == "model" and not packaged_corpus_path(model, corpus).is_file():
        print(f"no packaged C0 corpus of {counts[-1]} texts for {model_name}: reading the cached draw, or sampling "
              "it from the model once (resumable, cached for later runs)", flush=True)
    started = time.perf_counter()
    texts = corpus_texts(model, corpus, show_progress=config.show_progress)
    record["corpus"].update(available=len(texts), seconds=round(time.perf_counter() - started, 1))
    if len(texts) < counts[-1]:
        print(f"the corpus holds {len(texts)} texts, fewer than {counts[-1]}: stopping at {len(texts)}", flush=True)
        counts = [c for c in counts if c < len(texts)] + [len(texts)]
    record["counts"] = counts

    record["unedited"] = evaluate_counterfact(model, facts).as_dict()
    started = time.perf_counter()
    targets = memit_targets(model, facts, config)
    record["targets_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out, record)

    adapter = ModelAdapter.of(model)
    originals = {layer: adapter.down_projection(model, layer).detach().clone() for layer in layers}
    prefixes = prefix_key_stats(model, layers, texts, counts, corpus, show_progress=config.show_progress)
    c0_seconds = 0.0
    for _ in counts:
        started = time.perf_counter()
        stats = next(prefixes)
        c0_seconds += time.perf_counter() - started
        started = time.perf_counter()
        edit = apply_memit(model, facts, config, targets=targets, c0=stats.c0)
        try:
            edit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            scores = evaluate_counterfact(model, facts).as_dict()
            eval_seconds = time.perf_counter() - started
        finally:
            edit.undo(model)
        if not all(torch.equal(adapter.down_projection(model, layer), w) for layer, w in originals.items()):
            raise RuntimeError("the weights differ from the original ones after undoing the edit")
        record["rows"].append({
            "samples": stats.texts, "tokens": stats.tokens, "c0_seconds": round(c0_seconds, 1),
            **{k: scores[k] for k in ("ES", "PS", "NS", "score", "EM", "PM", "NM")},
            "update_norms": {str(layer): norm for layer, norm in edit.norms().items()},
            "edit_seconds": round(edit_seconds, 1), "eval_seconds": round(eval_seconds, 1),
            "load_average": list(os.getloadavg()), "weights_restored": True,
        })
        write_json_atomic(out, record)  # after every count, so a killed run keeps what it finished
        print(table_line(record["rows"][-1]), flush=True)
    return record


def table_line(row: dict) -> str:
    return (f"{row['samples']:>7} {row['tokens']:>9} {row['c0_seconds']:>10.1f} "
            f"{row['ES']:6.3f} {row['PS']:6.3f} {row['NS']:6.3f} {row['score']:6.3f}")


def table(record: dict) -> str:
    """The rows as a small fixed-width table, the unedited model's scores first."""
    u = record["unedited"]
    lines = [f"{'samples':>7} {'tokens':>9} {'c0_seconds':>10} {'ES':>6} {'PS':>6} {'NS':>6} {'score':>6}",
             f"{'unedited':>28} {u['ES']:6.3f} {u['PS']:6.3f} {u['NS']:6.3f} {u['score']:6.3f}"]
    return "\n".join(lines + [table_line(row) for row in record["rows"]])


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--samples takes comma-separated integers, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--samples needs at least one count, all >= 1")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("-n", "--n-edits", type=int, default=100, help="facts edited at once (default 100)")
    p.add_argument("--samples", type=parse_counts, default=parse_counts(DEFAULT_SAMPLES),
                   help=f"C0 sample counts (default {DEFAULT_SAMPLES})")
    p.add_argument("--corpus", default="model", help="C0 corpus: 'model' (default), a text file or folder, hf:NAME")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    from editing.covariance import CorpusConfig
    from editing.memit import MemitConfig
    from tracing.facts import known_facts, one_per_subject, spread
    from tracing.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    facts = spread(one_per_subject(known_facts()), args.n_edits)
    if len(facts) < args.n_edits:
        print(f"only {len(facts)} bundled facts with distinct subjects; editing those", file=sys.stderr)
    model = load_model(args.model)
    config = MemitConfig(corpus=CorpusConfig(source=args.corpus))
    record = sweep(model, facts, args.samples, config, args.out, model_name=args.model,
                   threads=torch.get_num_threads())
    print(f"{record['facts']} facts, layers {record['layers']}, λ = {record['mom2_weight']:.0f}, "
          f"z in {record['targets_seconds']} s\n{table(record)}\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
