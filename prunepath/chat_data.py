"""Chat-format distillation data: the dense model's own answers to instructions made from text.

Fine-tuning on plain prose teaches the sparse model to imitate the dense one on prose, not on
what an instruct model is used for: answering in its chat template (EVAL.md: after prose-only
distillation, sparse answers began with end-of-turn). This module makes chat-format sequences
without any evaluation data:

1. :func:`instruction_prompts` - user turns built from passages of calibration text (WikiText-2
   *validation*) with a few instruction templates (summarize, continue, explain, ask, simplify);
2. :func:`sample_chat_ids` - the model answers each one at budget 1.0 (the dense model; routing
   state restored afterwards), sampled (temperature, top-k), and every whole conversation
   (template, user turn, answer, end of turn) is tokenized and packed into rows of ``seq_len``
   token ids for :func:`prunepath.finetune.finetune`.
"""

from __future__ import annotations

import contextlib
import random

import torch

INSTRUCTIONS = (
    "Summarize the following text in two or three sentences.\n\n{passage}",
    "Continue this text for a few sentences.\n\n{passage}",
    "What is this passage about? Explain it briefly.\n\n{passage}",
    "Write three questions a reader could ask about this text, and answer one of them.\n\n{passage}",
    "Rewrite this passage in simple words for a child.\n\n{passage}",
    "Give a short title for this text and list its key facts.\n\n{passage}",
)


def instruction_prompts(texts: list[str], n: int, *, seed: int = 0, min_chars: int = 200,
                        max_chars: int = 700) -> list[str]:
    """``n`` user turns: an instruction template around a passage of ``texts`` (lines of text).

    Passages are consecutive lines joined until ``min_chars`` (cut at ``max_chars``); headings
    and empty lines are skipped. Passages and templates are drawn with ``seed``, passages reused
    (with other templates) when ``n`` exceeds them.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    passages, cur = [], ""
    for line in texts:
        line = line.strip()
        if not line or line.startswith("="):  # WikiText headings: " = Title = "
            continue
        cur = f"{cur} {line}".strip()
        if len(cur) >= min_chars:
            passages.append(cur[:max_chars])
            cur = ""
    if not passages:
        raise ValueError(f"texts hold no passage of at least {min_chars} characters")
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    return [rng.choice(INSTRUCTIONS).format(passage=passages[order[i % len(order)]]) for i in range(n)]


def chat_token_ids(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    """Token ids of a chat (``[{"role", "content"}, ...]``) in the tokenizer's chat template,
    with the assistant header appended when ``generation_prompt``; a tokenizer without a
    template gets the messages' text joined by newlines."""
    if not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, L]: token-id lists right-aligned (left padding with
    ``pad``), the layout batched ``generate`` needs."""
    L = max(len(q) for q in seqs)
    x = torch.full((len(seqs), L), pad, dtype=torch.long)
    m = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, q in enumerate(seqs):
        x[r, L - len(q):] = torch.tensor(q, dtype=torch.long)
        m[r, L - len(q):] = 1
    return x, m


@torch.inference_mode()
def sample_chat_ids(model, tokenizer, prompts: list[str], *, seq_len: int = 512, max_new_tokens: int = 256,
                    temperature: float = 0.8, top_k: int = 50, batch_size: int = 64, seed: int = 0,
                    progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The model's sampled answers to ``prompts`` at budget 1.0, as packed training rows.

    Returns ``(ids [N, seq_len], answers)``: every conversation (chat template with the user
    turn and the answer) tokenized, concatenated in prompt order and cut into rows of ``seq_len``
    (the remainder dropped), and the answers' text. A converted model answers as the dense
    model (budget 1.0); its routing state is restored afterwards.
    """
    from tqdm.auto import tqdm

    from .budget import routing_state
    from .layers import RoutedFFN

    if not prompts:
        raise ValueError("prompts is empty")
    for name, v in (("seq_len", seq_len), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                    ("top_k", top_k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    converted = any(isinstance(mod, RoutedFFN) for mod in model.modules())
    guard = routing_state(model, "dense") if converted else contextlib.nullcontext()
    torch.manual_seed(seed)
    answers: list[str] = []
    flat: list[int] = []
    bar = tqdm(total=len(prompts), desc="sampling chat answers (dense)", disable=not progress)
    with guard:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            x, m = left_padded([chat_token_ids(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
                                for p in chunk], pad)
            L = x.shape[1]
            out = model.generate(input_ids=x.to(dev), attention_mask=m.to(dev), do_sample=True,
                                 temperature=temperature, top_k=top_k, top_p=None, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad)
            for r, p in enumerate(chunk):
                text = tokenizer.decode(out[r, L:], skip_special_tokens=True).strip()
                answers.append(text)
                flat.extend(chat_token_ids(tokenizer, [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": text}],
                                           generation_prompt=False))
            bar.update(len(chunk))
    bar.close()
    rows = len(flat) // seq_len
    if rows == 0:
        raise ValueError(f"the sampled conversations hold {len(flat)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(flat[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len), answers
