"""Greedy generation with the chat template, batched with left padding.

Used by the XSum and instruction-following suites. The model's own ``generate`` is used (a
PrunePath-converted model routes every decode step through its RoutedFFNs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..chat_data import chat_token_ids, left_padded
from .scoring import model_device


def chat_prompt_ids(tokenizer, user_message: str, *, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of a one-turn chat (user message, then the assistant header).

    Uses the tokenizer's chat template; a tokenizer without one gets the plain message.
    A message longer than ``max_prompt_tokens`` is cut (its middle/end dropped) before templating.
    """
    if max_prompt_tokens is not None:
        ids = tokenizer(user_message, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            user_message = tokenizer.decode(ids[:max_prompt_tokens])
    return chat_token_ids(tokenizer, [{"role": "user", "content": user_message}], generation_prompt=True)


@dataclass
class Generation:
    prompt_ids: list[int]
    answer_ids: list[int]  # generated tokens, eos excluded
    text: str


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return sorted(ids)


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy continuations of tokenized prompts (left-padded batches, stops at eos)."""
    dev = model_device(model)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        x, m = left_padded([list(prompts[i]) for i in idx], pad)
        L = x.shape[1]
        gen = model.generate(
            input_ids=x.to(dev),
            attention_mask=m.to(dev),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos or None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for r, i in enumerate(idx):
            new = gen[r, L:].tolist()
            cut = len(new)
            for j, t in enumerate(new):
                if t in eos:
                    cut = j
                    break
            ans = new[:cut]
            out[i] = Generation(list(prompts[i]), ans, tokenizer.decode(ans, skip_special_tokens=True).strip())
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]
