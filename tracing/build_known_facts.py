"""Rebuild ``tracing/data/known_facts.json``: the bundled facts the embedded model actually knows.

Causal tracing only makes sense on facts the model gets right (a corrupted run can only "lose" a fact
that the clean run had), and an edit is only a change when the old answer was the model's answer. So a
hand-written candidate ``(subject, answer)`` counts as *known* when the model's greedy next token after
the relation's main prompt equals the first token of the answer (tokenised with a leading space, as
ROME/MEMIT do), optionally with at least ``--min-prob`` probability on that token. An answer whose
first token starts a *different* answer of the same relation too (" y" for both "yen" and "yuan" in the
SmolLM2 tokenizer) cannot be checked that way, so such candidates are set aside and listed; which ones
clash depends on the tokenizer, so the candidates file keeps them.

Candidates live in ``tracing/data/fact_candidates.json``: a list of entries. The first entry with a
given Wikidata style id defines that relation: a main template (``{}`` marks the subject), paraphrase
and generation templates, and ``[subject, answer]`` pairs. A later entry with the same id holds only
``relation`` and more ``pairs`` (and optionally a ``description``): it extends that relation. Subjects
are unique within a relation, across all its entries. Every kept fact becomes a CounterFact-shaped
record, numbered (``case_id``) in file order:

* ``paraphrase_prompts``: the relation's paraphrase templates filled with the subject;
* ``neighborhood_prompts``: main prompts of up to 5 *other* subjects with the same true answer (known
  ones first), which an edit of this fact must leave alone;
* ``locality``: up to 5 other known facts of the relation with their own answers (different answers
  first), as unrelated-knowledge checks;
* ``target_new``: a counterfactual answer of the same relation whose first token differs from the true
  one, drawn with a seed derived from the relation and subject, so the file is identical on every run.

Neighbours, locality facts and counterfactuals are drawn only from the pairs of the fact's own entry
and of the earlier entries of its relation. So new candidates go into entries appended at the end of
the file, and then every record built before stays exactly as it was (same ``case_id`` too), as long
as the model's verdicts on the old candidates do not change and no new answer shares its first token
with an old answer of the relation (that sets both aside, see above).

The script also prints how prepending BOS changes the picture (SmolLM2's BOS is the chat marker
``<|im_start|>``, which is why the embedded model runs without it).

    python -m tracing.build_known_facts [--model smollm2] [--out PATH] [--min-prob 0.0] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from tracing.candidates import CANDIDATES_FILE, Candidate, fill, load_candidates
from tracing.facts import DATA_DIR, KNOWN_FACTS_FILE, Fact, save_facts
from tracing.models import EMBEDDED_MODEL, load_model
from tracing.placement import input_device
from tracing.tokens import encode, target_token_ids

MAX_NEIGHBORS = 5
MAX_LOCALITY = 5
BATCH_SIZE = 32


@dataclass(frozen=True)
class Score:
    """The model's verdict on one prompt: does its top-1 token start the answer, and with what p."""

    top1_matches: bool
    p_answer: float




def ambiguous_answers(candidates: list[Candidate], answer_first_token: dict[str, int]) -> set[tuple[str, str]]:
    """``(relation id, answer)`` pairs whose first token also starts another answer of that relation."""
    answers: dict[tuple[str, int], set[str]] = defaultdict(set)
    for c in candidates:
        answers[(c.relation.relation_id, answer_first_token[c.answer])].add(c.answer)
    return {(relation_id, a) for (relation_id, _), group in answers.items() if len(group) > 1 for a in group}


def toggle_bos(ids: list[int], bos: int, policy_has_bos: bool) -> list[int]:
    """The same prompt under the opposite BOS policy."""
    return ids[1:] if policy_has_bos else [bos, *ids]


@torch.no_grad()
def score_prompts(model, prompts: list[list[int]], answer_ids: list[int]) -> list[Score]:
    """Next-token verdicts for token-id prompts, batched by length so no padding is ever read."""
    device = input_device(model)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    scores: dict[int, Score] = {}
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), BATCH_SIZE):
            chunk = indices[start:start + BATCH_SIZE]
            batch = torch.tensor([prompts[i] for i in chunk], device=device)
            probs = model(batch)[:, -1, :].float().softmax(dim=-1)
            top1 = probs.argmax(dim=-1)
            for row, i in enumerate(chunk):
                scores[i] = Score(int(top1[row]) == answer_ids[i], float(probs[row, answer_ids[i]]))
    return [scores[i] for i in range(len(prompts))]


def pool(candidate: Candidate, by_relation: dict[str, list[Candidate]]) -> list[Candidate]:
    """The candidates a record of ``candidate`` may draw on: its relation's, up to its own entry."""
    return [c for c in by_relation[candidate.relation.relation_id] if c.entry <= candidate.entry]


def counterfactual(
    candidate: Candidate, pooled: list[Candidate], answer_first_token: dict[str, int], rng: random.Random
) -> str:
    """Another answer of the relation whose first token differs from the true answer's."""
    true_token = answer_first_token[candidate.answer]
    options = sorted({c.answer for c in pooled if answer_first_token[c.answer] != true_token})
    if not options:
        raise ValueError(f"{candidate.relation.relation_id}: no counterfactual for {candidate.answer!r}")
    return rng.choice(options)


def neighborhood(candidate: Candidate, pooled: list[Candidate], known: set[Candidate]) -> tuple[str, ...]:
    """Main prompts of other subjects with the same answer, known subjects first."""
    same = [c for c in pooled if c.answer == candidate.answer and c.subject != candidate.subject]
    same.sort(key=lambda c: c not in known)  # stable: keeps file order within each group
    return tuple(c.prompt for c in same[:MAX_NEIGHBORS])


def locality(
    candidate: Candidate, pooled: list[Candidate], known: set[Candidate], rng: random.Random
) -> tuple[tuple[str, str], ...]:
    """Up to 5 other known facts of the relation, preferring ones with a different answer."""
    others = [c for c in pooled if c in known and c.subject != candidate.subject]
    rng.shuffle(others)
    others.sort(key=lambda c: c.answer == candidate.answer)
    return tuple((c.prompt, c.answer) for c in others[:MAX_LOCALITY])


def build_facts(
    candidates: list[Candidate], known: list[Candidate], answer_first_token: dict[str, int]
) -> list[Fact]:
    known_set = set(known)
    by_relation: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_relation[c.relation.relation_id].append(c)
    facts = []
    for case_id, candidate in enumerate(known):
        relation = candidate.relation
        pooled = pool(candidate, by_relation)
        # Seeded by the fact itself, so adding candidates elsewhere never reshuffles this record.
        rng = random.Random(f"{relation.relation_id}:{candidate.subject}")
        target_new = counterfactual(candidate, pooled, answer_first_token, rng)
        facts.append(Fact(
            subject=candidate.subject,
            template=relation.template,
            target_true=candidate.answer,
            target_new=target_new,
            paraphrases=tuple(fill(t, candidate.subject) for t in relation.paraphrases),
            neighborhood=neighborhood(candidate, pooled, known_set),
            generation_prompts=tuple(fill(t, candidate.subject) for t in relation.generation),
            locality=locality(candidate, pooled, known_set, rng),
            relation=relation.relation_id,
            case_id=case_id,
        ))
    return facts


def bos_token(model) -> int:
    tokenizer = model.tokenizer
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def print_bos_effect(policy: list[Score], flipped: list[Score], policy_has_bos: bool) -> None:
    with_bos, without_bos = (policy, flipped) if policy_has_bos else (flipped, policy)
    for label, scores in (("without BOS", without_bos), ("with BOS", with_bos)):
        rate = sum(s.top1_matches for s in scores) / len(scores)
        mean_p = sum(s.p_answer for s in scores) / len(scores)
        print(f"  {label:12} top-1 match {rate:6.1%}   mean p(answer) {mean_p:.3f}")


def print_summary(candidates: list[Candidate], known: list[Candidate]) -> None:
    total: dict[str, int] = defaultdict(int)
    kept: dict[str, int] = defaultdict(int)
    for c in candidates:
        total[c.relation.relation_id] += 1
    for c in known:
        kept[c.relation.relation_id] += 1
    print(f"{'relation':10} {'candidates':>10} {'kept':>6}")
    for relation_id in total:
        print(f"{relation_id:10} {total[relation_id]:10d} {kept[relation_id]:6d}")
    print(f"{'total':10} {len(candidates):10d} {len(known):6d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--candidates", type=Path, default=CANDIDATES_FILE)
    parser.add_argument("--out", type=Path, default=DATA_DIR / KNOWN_FACTS_FILE)
    parser.add_argument("--min-prob", type=float, default=0.0,
                        help="also require at least this probability on the answer's first token")
    parser.add_argument("--device", default="cpu",
                        help="cpu by default, so the bundled file does not depend on GPU rounding")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    candidates = load_candidates(args.candidates)
    answer_first_token = {c.answer: target_token_ids(model, c.answer)[0] for c in candidates}
    answer_ids = [answer_first_token[c.answer] for c in candidates]
    prompts = [encode(model, c.prompt) for c in candidates]
    policy_has_bos = bool(model.cfg.default_prepend_bos)
    bos = bos_token(model)

    policy = score_prompts(model, prompts, answer_ids)
    flipped = score_prompts(model, [toggle_bos(p, bos, policy_has_bos) for p in prompts], answer_ids)
    ambiguous = ambiguous_answers(candidates, answer_first_token)
    known = [
        c for c, s in zip(candidates, policy)
        if s.top1_matches and s.p_answer >= args.min_prob and (c.relation.relation_id, c.answer) not in ambiguous
    ]
    save_facts(build_facts(candidates, known, answer_first_token), args.out)

    print_summary(candidates, known)
    if ambiguous:
        print("set aside, first token shared by two answers of a relation: "
              + ", ".join(f"{relation_id} {answer}" for relation_id, answer in sorted(ambiguous)))
    print(f"BOS effect over all {len(candidates)} candidates (model policy: "
          f"{'with' if policy_has_bos else 'without'} BOS):")
    print_bos_effect(policy, flipped, policy_has_bos)
    print(f"wrote {len(known)} facts to {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
