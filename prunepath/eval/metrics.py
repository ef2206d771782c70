"""Plain metric arithmetic: perplexity, accuracy with standard error, ROUGE.

No model code here, so every function can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood) over ``n_tokens`` tokens (natural log)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    return math.exp(nll_sum / n_tokens)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for n < 2)."""
    n = len(values)
    if n == 0:
        raise ValueError("values is empty")
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def accuracy(correct: Sequence[bool]) -> dict:
    """``{"acc", "acc_stderr", "n"}`` of a list of right/wrong outcomes."""
    m, se = mean_and_stderr([1.0 if c else 0.0 for c in correct])
    return {"acc": m, "acc_stderr": se, "n": len(correct)}


_SCORER = None


def _rouge_scorer():
    global _SCORER  # a cache of an immutable scorer object, built on first use
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return _SCORER


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against one reference (rouge-score, Porter stemming).

    Identical strings score 1 (also when rouge-score finds no tokens in them, e.g. two empty answers).
    """
    if prediction == reference:
        return {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    s = _rouge_scorer().score(reference, prediction)
    return {"rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure, "rougeL": s["rougeL"].fmeasure}


def mean_rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (and stderr of each) over aligned prediction/reference lists."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        raise ValueError("predictions is empty")
    per = [rouge(p, r) for p, r in zip(predictions, references)]
    out = {}
    for k in ("rouge1", "rouge2", "rougeL"):
        m, se = mean_and_stderr([x[k] for x in per])
        out[k] = m
        out[k + "_stderr"] = se
    return out
