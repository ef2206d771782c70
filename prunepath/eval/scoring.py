"""Log-likelihood scoring with a Hugging Face causal LM: sliding-window NLL and continuations.

All functions take any ``model(input_ids, attention_mask=...) -> .logits`` causal LM and a
Hugging Face tokenizer; they run under ``torch.inference_mode`` and never add special tokens
(the text is scored exactly as tokenized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless toy
        return torch.device("cpu")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """``(logprob of each actual next token [B, T-1], greedy argmax [B, T-1])`` in fp32."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    tgt = input_ids[:, 1:]
    return lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1), logits.argmax(-1)


# --------------------------------------------------------------------------- perplexity


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_target)`` windows covering tokens 1..n-1 exactly once.

    Window ``[begin, end)`` (at most ``window`` tokens) is fed to the model and its last
    ``n_target`` tokens are scored; ``end`` advances by ``stride``. Every scored token has
    at least ``window - stride`` tokens of context (except in the first window), and every
    token but the first is scored exactly once.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window={window}) (each window needs context), got {stride}")
    out = []
    prev_end = 1  # token 0 has no prediction
    end = min(window, n_tokens)
    while prev_end < n_tokens:
        begin = max(0, end - window)
        out.append((begin, end, end - prev_end))
        prev_end = end
        end = min(end + stride, n_tokens)
    return out


@dataclass
class NLLResult:
    nll_sum: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        from .metrics import perplexity

        return perplexity(self.nll_sum, self.n_tokens)


@torch.inference_mode()
def sliding_window_nll(
    model,
    ids: Sequence[int] | torch.Tensor,
    *,
    window: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "ppl",
) -> NLLResult:
    """Summed next-token NLL of a token stream with strided sliding windows (token-level ppl)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens")
    dev = model_device(model)
    wins = sliding_windows(ids.numel(), window, stride)
    nll, n = 0.0, 0
    # windows of equal length batch together (all but possibly the last)
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = tqdm(total=len(wins), desc=desc, disable=not progress, leave=False)
    for g in groups:
        x = torch.stack([ids[b:e] for b, e, _ in g]).to(dev)
        lp, _ = next_token_logprobs(model, x)
        for row, (b, e, k) in zip(lp, g):
            nll -= row[-k:].double().sum().item()
            n += k
        bar.update(len(g))
    bar.close()
    return NLLResult(nll, n)


# --------------------------------------------------------------------------- continuations


@dataclass
class ContinuationScore:
    logprob: float  # summed log-prob of the continuation tokens
    n_tokens: int
    greedy: bool  # every continuation token is the argmax


def split_context_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, cut where the joint tokenization splits them.

    As lm-evaluation-harness does: trailing spaces of the context move to the continuation,
    the whole string is tokenized once, and the continuation is its last
    ``len(whole) - len(context)`` tokens.
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    k = len(whole) - len(ctx)
    if k <= 0:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing after {context[-40:]!r}")
    return whole[:-k], whole[-k:]


def score_continuations(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "score",
) -> list[ContinuationScore]:
    """Log-prob, length and greedy-exactness of each (context, continuation) text pair."""
    enc = [split_context_continuation(tokenizer, c, t) for c, t in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_token_pairs(
        model, enc, pad_id=pad, batch_size=batch_size, max_length=max_length, progress=progress, desc=desc
    )


@torch.inference_mode()
def score_token_pairs(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "score",
) -> list[ContinuationScore]:
    """Like :func:`score_continuations` on token ids ``(context_ids, continuation_ids)``.

    Inputs are right-padded (causal attention: padding never affects real tokens). Contexts
    longer than ``max_length`` are cut from the left. An empty context is not allowed
    (the first continuation token would have no prediction).
    """
    dev = model_device(model)
    enc = []
    for c, t in pairs:
        if len(t) == 0:
            raise ValueError("a continuation is empty")
        if len(c) == 0:
            raise ValueError("a context is empty; the first continuation token needs a prefix")
        seq = list(c) + list(t)
        if max_length is not None and len(seq) > max_length:
            if len(t) >= max_length:
                raise ValueError(f"continuation of {len(t)} tokens does not fit max_length={max_length}")
            seq = seq[-max_length:]
        enc.append((seq, len(t)))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))  # long first, less padding
    out: list[ContinuationScore | None] = [None] * len(enc)
    bar = tqdm(total=len(enc), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        L = max(len(enc[i][0]) for i in idx)
        x = torch.full((len(idx), L), pad_id, dtype=torch.long)
        m = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = enc[i][0]
            x[r, : len(seq)] = torch.tensor(seq)
            m[r, : len(seq)] = 1
        x, m = x.to(dev), m.to(dev)
        lp, am = next_token_logprobs(model, x, m)
        for r, i in enumerate(idx):
            seq, k = enc[i]
            n = len(seq)
            # continuation tokens are positions n-k..n-1, predicted at n-k-1..n-2
            sl = slice(n - k - 1, n - 1)
            greedy = bool((am[r, sl] == x[r, n - k : n]).all().item())
            out[i] = ContinuationScore(lp[r, sl].double().sum().item(), k, greedy)
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]
