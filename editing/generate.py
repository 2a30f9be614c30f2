"""Sampling text from the model: MEMIT's context templates, the offline covariance corpus, and the
generations whose n-gram entropy measures fluency after an edit."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from tracing.placement import input_device
from tracing.tokens import encode


@torch.no_grad()
def sample_continuations(model, prompts: Sequence[str], max_new_tokens: int, *, top_k: int | None = None,
                         top_p: float | None = None, seed: int = 0, batch_size: int = 32,
                         show_progress: bool = False, desc: str = "sampling") -> list[str]:
    """Sample one continuation per prompt (prompt included in the returned text).

    Runs Hugging Face ``generate`` on the model under the bridge, so weight edits and bridge hooks
    (e.g. WISE's routing) are in effect. Reproducible: the RNG is seeded and restored afterwards.
    """
    hf_model = model.original_model
    tokenizer = model.tokenizer
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            encoded = [encode(model, p) for p in prompts[start: start + batch_size]]
            width = max(len(ids) for ids in encoded)
            # left padding keeps every prompt's last token at the same position for generation
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            output = hf_model.generate(
                ids, attention_mask=mask, do_sample=True, top_k=top_k or 0, top_p=top_p or 1.0,
                max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=1.0,
            )
            for row, prompt_ids in zip(output, encoded):
                new = row[width:].tolist()
                texts.append(tokenizer.decode(prompt_ids + new, skip_special_tokens=True))
    return texts
