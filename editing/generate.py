"""Text from the model: sampled continuations (MEMIT's context templates, the offline covariance corpus, the
generations whose n-gram entropy measures fluency) and greedy ones (generated-answer scoring).

Both run Hugging Face ``generate`` on the model under the bridge, so weight edits and bridge hooks (e.g.
WISE's routing, GRACE's codebook) are in effect, on left-padded batches: every prompt's last token sits at
the same position, and the attention mask and the position ids the model derives from it hide the padding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from tracing.placement import input_device
from tracing.tokens import encode, pad_id


def _left_padded_batches(model, prompts: Sequence[str], batch_size: int, show_progress: bool = False,
                         desc: str = "", first: int = 0) -> Iterator[tuple[list[list[int]], torch.Tensor, torch.Tensor]]:
    """(encoded prompts, left-padded ids, attention mask) per batch of ``prompts``, from batch ``first``."""
    device = input_device(model)
    pad = pad_id(model.tokenizer)
    batches = range(first * batch_size, len(prompts), batch_size)
    for start in tqdm(batches, desc=desc, disable=not show_progress, leave=False, initial=first,
                      total=math.ceil(len(prompts) / batch_size)):
        encoded = [encode(model, p) for p in prompts[start: start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        yield encoded, ids, mask


@torch.no_grad()
def sample_continuations(model, prompts: Sequence[str], max_new_tokens: int, *, top_k: int | None = None,
                         top_p: float | None = None, seed: int = 0, batch_size: int = 32,
                         show_progress: bool = False, desc: str = "sampling",
                         checkpoint: Path | None = None) -> list[str]:
    """Sample one continuation per prompt (prompt included in the returned text).

    Reproducible: the RNG is seeded and restored afterwards. ``checkpoint``: a file that receives the texts
    so far and the RNG state after every batch; a call with the same arguments that finds it samples only
    the remaining batches, and returns what an uninterrupted call would (:mod:`editing.sampling_checkpoint`).
    The caller removes it once the draw is stored.
    """
    from editing.sampling_checkpoint import SamplingProgress, load_sampling, sampling_run, save_sampling

    hf_model, tokenizer = model.original_model, model.tokenizer
    device = input_device(model)
    pad = pad_id(tokenizer)
    on_cuda = device.type == "cuda"
    run = None if checkpoint is None else sampling_run(  # the prompts' digest only where a checkpoint needs it
        prompts, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size)
    resumed = load_sampling(checkpoint, run) if checkpoint is not None else None
    texts: list[str] = list(resumed.texts) if resumed else []
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.manual_seed(seed)
        if resumed:
            torch.set_rng_state(resumed.cpu_rng)
            if on_cuda and resumed.cuda_rng is not None:
                torch.cuda.set_rng_state(resumed.cuda_rng, device)
        first = len(texts) // batch_size
        for encoded, ids, mask in _left_padded_batches(model, prompts, batch_size, show_progress, desc, first):
            output = hf_model.generate(
                ids, attention_mask=mask, do_sample=True, top_k=top_k or 0, top_p=top_p or 1.0,
                max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=1.0,
            )
            for row, prompt_ids in zip(output, encoded):
                new = row[ids.shape[1]:].tolist()
                texts.append(tokenizer.decode(prompt_ids + new, skip_special_tokens=True))
            if checkpoint is not None and len(texts) < len(prompts):
                save_sampling(checkpoint, SamplingProgress(
                    texts, torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None), run)
    return texts


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[str], max_new_tokens: Sequence[int],
                         batch_size: int = 32) -> list[list[int]]:
    """The greedy (argmax) tokens generated after each prompt, at most ``max_new_tokens[i]`` of them for
    prompt i, cut before the first end-of-sequence token. No teacher forcing: each token is chosen from
    the model's own previous ones. A row's tokens do not depend on which rows share its batch."""
    if len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token counts")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError("every prompt needs at least one token to generate")
    hf_model, tokenizer = model.original_model, model.tokenizer
    eos = tokenizer.eos_token_id
    results: list[list[int]] = []
    for start, (encoded, ids, mask) in zip(range(0, len(prompts), batch_size),
                                           _left_padded_batches(model, prompts, batch_size)):
        counts = max_new_tokens[start: start + len(encoded)]
        output = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(counts),
                                   min_new_tokens=0, pad_token_id=pad_id(tokenizer), eos_token_id=eos,
                                   num_beams=1, temperature=None, top_k=None, top_p=None)
        for row, count in zip(output[:, ids.shape[1]:].tolist(), counts):
            row = row[:count]
            results.append(row[: row.index(eos)] if eos in row else row)
    return results
