"""The evaluation suites, one function each: model + tokenizer in, a dict of numbers out.

Suites: ``wikitext2`` (strided sliding-window token perplexity), ``lambada`` (last-word
accuracy and perplexity), ``nlu`` (8 zero-shot tasks through lm-evaluation-harness),
``xsum`` (chat-template summaries, ROUGE-1/2/L), ``story_cloze`` (right-ending accuracy and
perplexity), ``alpaca_eval`` / ``mt_bench`` (first-turn answers; fidelity to the dense
model's answers). Every result holds ``n`` (items scored) and ``data`` (file, sha256).
"""

from __future__ import annotations

import math

from . import data as D
from .metrics import accuracy, mean_and_stderr, mean_rouge, perplexity, rouge
from .scoring import encode, score_continuations, score_token_pairs, sliding_window_nll

from .names import GENERATION_SUITES, SUITES  # noqa: E402  (GENERATION_SUITES: answers scored vs dense)

# headline metric per suite (for tables and plots): (key, higher_is_better, label)
HEADLINE = {
    "wikitext2": ("ppl", False, "WikiText-2 ppl"),
    "lambada": ("acc", True, "LAMBADA acc"),
    "nlu": ("mean_acc", True, "NLU mean acc (8 tasks)"),
    "xsum": ("rougeL", True, "XSum ROUGE-L"),
    "story_cloze": ("acc", True, "Story Cloze acc"),
    "alpaca_eval": ("fidelity_rougeL", True, "AlpacaEval ROUGE-L vs dense"),
    "mt_bench": ("fidelity_rougeL", True, "MT-Bench ROUGE-L vs dense"),
}


def _data_info(name: str, data_dir) -> dict:
    path = D.data_file(name, data_dir)
    return {"file": D.FILES[name], "sha256": D.sha256_file(path)}


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


# --------------------------------------------------------------------------- perplexity


def wikitext2(
    model,
    tokenizer,
    *,
    data_dir=None,
    limit: int | None = None,
    window: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    split: str = "test",
    text: str | None = None,
    progress: bool = True,
) -> dict:
    """Token-level perplexity of WikiText-2 (the whole file concatenated, tokenized once).

    Strided sliding windows of ``window`` tokens advancing by ``stride``: every token but the
    first is scored once, with at least ``window - stride`` tokens of context.
    ``limit`` keeps the first ``limit`` windows (``limit * stride`` scored tokens, about).
    ``text`` replaces the file (e.g. the bundled validation sample, see the quickstart).
    """
    from_file = text is None
    if from_file:
        name = {"test": "wikitext2_test", "valid": "wikitext2_valid"}[split]
        text = D.read_wikitext(D.data_file(name, data_dir))
        info = _data_info(name, data_dir)
    else:
        info = {"file": "<given text>", "sha256": None}
    ids = encode(tokenizer, text)
    if limit is not None:
        ids = ids[: window + max(limit - 1, 0) * stride]
    r = sliding_window_nll(model, ids, window=window, stride=stride, batch_size=batch_size, progress=progress,
                           desc="wikitext2")
    out = {
        "ppl": r.ppl,
        "nll_per_token": r.nll_sum / r.n_tokens,
        "tokens_scored": r.n_tokens,
        "tokens_total": len(ids),
        "window": window,
        "stride": stride,
        "n": r.n_tokens,
        "data": info,
    }
    if limit is None and from_file and split == "test":
        # word-level ppl normalised by the README's 245,569 words (incl. one <eos> per line)
        out["word_ppl"] = math.exp(r.nll_sum / 245_569)
    return out


# --------------------------------------------------------------------------- lambada


def lambada(model, tokenizer, *, data_dir=None, limit=None, batch_size=8, progress=True) -> dict:
    """Last-word accuracy (greedy: every target token is the argmax) and perplexity.

    ``ppl`` = exp(mean over passages of the target's NLL) (lm-eval's lambada definition);
    ``token_ppl`` = exp(total NLL / target tokens).
    """
    items = D.load_lambada(D.data_file("lambada", data_dir), limit)
    sc = score_continuations(
        model, tokenizer, [(i.context, i.continuation) for i in items], batch_size=batch_size, progress=progress,
        desc="lambada",
    )
    acc = accuracy([s.greedy for s in sc])
    nll = [-s.logprob for s in sc]
    return {
        **acc,
        "ppl": math.exp(sum(nll) / len(nll)),
        "token_ppl": perplexity(sum(nll), sum(s.n_tokens for s in sc)),
        "data": _data_info("lambada", data_dir),
    }


# --------------------------------------------------------------------------- story cloze


def story_cloze(model, tokenizer, *, data_dir=None, limit=None, batch_size=8, progress=True) -> dict:
    """Right-ending accuracy (summed log-prob; ``acc_norm``: per character) and the
    token perplexity of the right ending given the four-sentence story."""
    items = D.load_story_cloze(D.data_file("story_cloze", data_dir), limit)
    pairs = [(it.story, " " + e) for it in items for e in it.endings]
    sc = score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress, desc="story_cloze")
    right, right_norm, nll, ntok = [], [], 0.0, 0
    for j, it in enumerate(items):
        a, b = sc[2 * j], sc[2 * j + 1]
        la, lb = len(it.endings[0]) + 1, len(it.endings[1]) + 1
        pred = 0 if a.logprob >= b.logprob else 1
        pred_n = 0 if a.logprob / la >= b.logprob / lb else 1
        right.append(pred == it.gold)
        right_norm.append(pred_n == it.gold)
        g = (a, b)[it.gold]
        nll -= g.logprob
        ntok += g.n_tokens
    acc = accuracy(right)
    accn = accuracy(right_norm)
    return {
        **acc,
        "acc_norm": accn["acc"],
        "acc_norm_stderr": accn["acc_stderr"],
        "right_ending_ppl": perplexity(nll, ntok),
        "data": _data_info("story_cloze", data_dir),
    }


# --------------------------------------------------------------------------- NLU (lm-eval)


def nlu(model, tokenizer, *, data_dir=None, limit=None, batch_size=8, tasks=None, seed=1234, progress=True) -> dict:
    from .nlu import run_nlu

    r = run_nlu(model, tokenizer, tasks=tasks, data_dir=data_dir, limit=limit, batch_size=batch_size, seed=seed)
    r["n"] = sum(t["n"] for t in r["tasks"].values())
    return r


# --------------------------------------------------------------------------- generation


def _prompts(suite: str, data_dir, limit):
    loader = {"xsum": D.load_xsum, "alpaca_eval": D.load_alpaca_eval, "mt_bench": D.load_mt_bench}[suite]
    return loader(D.data_file(suite, data_dir), limit)


def generation_suite(
    suite: str,
    model,
    tokenizer,
    *,
    data_dir=None,
    limit=None,
    batch_size=8,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int = 768,
    dense_answers: list[dict] | str | None = None,
    progress=True,
) -> dict:
    """Greedy chat-template answers for ``suite`` ("xsum", "alpaca_eval", "mt_bench").

    XSum: ROUGE-1/2/L (stemmed) against the reference summary. All three: when
    ``dense_answers`` (the ``answers`` of the dense model's result) are given, fidelity to
    them: mean ROUGE-L between the two answers and this model's per-token NLL of the dense
    answer (teacher-forced after the same prompt). ``answers`` holds every generated text.
    """
    from .generation import chat_prompt_ids, generate_greedy

    if suite not in GENERATION_SUITES:
        raise ValueError(f"suite must be one of {GENERATION_SUITES}, got {suite!r}")
    if max_new_tokens is None:
        max_new_tokens = 64 if suite == "xsum" else 128
    items = _prompts(suite, data_dir, limit)
    prompts = [chat_prompt_ids(tokenizer, it.prompt, max_prompt_tokens=max_prompt_tokens) for it in items]
    gens = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=suite
    )
    answers = [
        {"id": it.id, "answer": g.text, "answer_ids": g.answer_ids, "n_tokens": len(g.answer_ids)}
        for it, g in zip(items, gens)
    ]
    out: dict = {"n": len(items), "max_new_tokens": max_new_tokens, "data": _data_info(suite, data_dir)}
    out["mean_answer_tokens"] = sum(a["n_tokens"] for a in answers) / max(len(answers), 1)
    if suite == "xsum":
        out.update(mean_rouge([g.text for g in gens], [it.reference for it in items]))
    if isinstance(dense_answers, str):
        if dense_answers != "self":
            raise ValueError(f"dense_answers must be a list of answers or 'self', got {dense_answers!r}")
        dense_answers = answers  # the dense model's own: ROUGE-L 1, NLL of its own greedy answers
    if dense_answers is not None:
        out.update(fidelity(model, tokenizer, prompts, answers, dense_answers, batch_size=batch_size,
                            progress=progress))
    out["answers"] = answers
    return out


def fidelity(model, tokenizer, prompts, answers, dense_answers, *, batch_size=8, progress=True) -> dict:
    """ROUGE-L(answer, dense answer) and this model's per-token NLL of the dense answers."""
    if len(dense_answers) != len(answers):
        raise ValueError(f"dense_answers has {len(dense_answers)} items, answers {len(answers)}")
    for a, d in zip(answers, dense_answers):
        if a["id"] != d["id"]:
            raise ValueError(f"dense answer ids do not line up: {a['id']!r} vs {d['id']!r}")
    rl = [rouge(a["answer"], d["answer"])["rougeL"] for a, d in zip(answers, dense_answers)]
    pairs = [(p, d["answer_ids"]) for p, d in zip(prompts, dense_answers) if d["answer_ids"]]
    sc = score_token_pairs(model, pairs, pad_id=_pad_id(tokenizer), batch_size=batch_size, progress=progress,
                           desc="fidelity")
    ntok = sum(s.n_tokens for s in sc)
    nll = -sum(s.logprob for s in sc)
    m, se = mean_and_stderr(rl)
    exact = sum(a["answer_ids"] == d["answer_ids"] for a, d in zip(answers, dense_answers)) / len(answers)
    return {
        "fidelity_rougeL": m,
        "fidelity_rougeL_stderr": se,
        "dense_answer_nll_per_token": nll / ntok if ntok else float("nan"),
        "dense_answer_tokens": ntok,
        "identical_to_dense": exact,
    }


def run_suite(suite: str, model, tokenizer, **kw) -> dict:
    """Dispatch by suite name (see :data:`SUITES`)."""
    if suite == "wikitext2":
        return wikitext2(model, tokenizer, **kw)
    if suite == "lambada":
        return lambada(model, tokenizer, **kw)
    if suite == "story_cloze":
        return story_cloze(model, tokenizer, **kw)
    if suite == "nlu":
        return nlu(model, tokenizer, **kw)
    if suite in GENERATION_SUITES:
        return generation_suite(suite, model, tokenizer, **kw)
    raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
