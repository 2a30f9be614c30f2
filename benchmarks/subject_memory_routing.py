"""Which prompts the subject memory's entries would answer on, for T edits, without editing anything.

Routing depends only on the keys, the thresholds and (under ``match="subject"``) the subjects' spellings,
not on the values δ, so this measures it for T = 1000 in minutes instead of the hour the edits take. It
measures the subject gates without the relation check (``relation_similarity=None``; the check's effect
is scored by ``benchmarks/relation_check.py``):

* ``own_prompt`` / ``own_paraphrase``: share of the edit prompts / paraphrases where the fact's own entry
  answers (what reliability and generalization need);
* ``locality_fired`` / ``unrelated_fired``: share of the facts' locality prompts / the held-out facts'
  prompts where any entry answers, split into prompts that name an edited subject (``..._naming``: a
  subject-keyed edit is meant to reach those) and prompts that name none (``..._other``: leaks).

    python benchmarks/subject_memory_routing.py [--edits 1000] [--threads 2]

Writes one JSON object per gate to benchmarks/results/subject_memory_routing.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
DEFAULT_OUT = Path(__file__).parent / "results" / "subject_memory_routing.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)

    import torch

    from editing.contexts import context_templates
    from editing.evaluate import locality_pairs
    from editing.subject_memory import SubjectMemoryConfig, SubjectMemoryEditor
    from editing.subject_spellings import SpellingIndex, subject_spellings, word_continuations
    from lifelong import embedded_stream, names_any
    from tracing.tokens import encode

    model, facts, held_out = embedded_stream(args.edits, args.threads)
    subjects = sorted({f.subject for f in facts})
    started = time.perf_counter()
    for match in ("state", "subject"):
        # the subject gates alone, as measured before the relation check (benchmarks/relation_check.py)
        editor = SubjectMemoryEditor(SubjectMemoryConfig(match=match, relation_similarity=None)).attach(model)
        config = editor.config
        templates = context_templates(model, config.context_prefixes, config.context_length, config.seed)
        contexts = [c for group in templates for c in group]
        editor.keys = editor._keys(facts, templates)
        editor.thresholds = [editor._threshold(k, f.subject) for k, f in zip(editor.keys, facts)]
        editor.spellings = [subject_spellings(model, f, contexts) for f in facts]
        editor._index = SpellingIndex(editor.spellings, word_continuations(model.tokenizer))

        def answering(prompts: list[str]) -> list[set[int]]:
            rows = [encode(model, p) for p in prompts]
            states = editor._states(rows)
            found = []
            for row, state in zip(rows, states):
                _, _, entries = editor._entries_at(state[None, : len(row)], torch.tensor([row]))
                found.append(set(entries.tolist()))
            return found

        own = answering([f.prompt for f in facts])
        paraphrases = [(i, p) for i, f in enumerate(facts) for p in f.paraphrases]
        own_para = answering([p for _, p in paraphrases])
        record = {"match": match, "T": len(facts), "own_prompt": sum(i in e for i, e in enumerate(own)) / len(facts),
                  "own_paraphrase": sum(i in e for (i, _), e in zip(paraphrases, own_para)) / len(paraphrases)}
        for name, prompts in (("locality", [p for p, _ in locality_pairs(facts)]),
                              ("unrelated", [f.prompt for f in held_out])):
            fired = answering(prompts)
            naming = [bool(e) for p, e in zip(prompts, fired) if names_any(p, subjects)]
            other = [bool(e) for p, e in zip(prompts, fired) if not names_any(p, subjects)]
            record.update({f"{name}_fired": sum(map(bool, fired)) / len(prompts),
                           f"{name}_fired_naming": [sum(naming) / max(len(naming), 1), len(naming)],
                           f"{name}_fired_other": [sum(other) / max(len(other), 1), len(other)]})
        editor.undo()
        record.update({"seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg()[0], "config": {"match": match}})
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
