"""Metrics and log-likelihood scoring on hand-checkable inputs (no downloads, toy models)."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath.eval import metrics
from prunepath.eval.scoring import (
    score_token_pairs,
    sliding_window_nll,
    sliding_windows,
)
from tests.eval_tiny import BigramLM


class FixedDistLM(torch.nn.Module):
    """Every position predicts the same distribution ``probs`` (context-free)."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.log(torch.tensor(probs, dtype=torch.float64)).float())

    def forward(self, input_ids, attention_mask=None, use_cache=None, **_):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1))


def test_perplexity_of_uniform_distribution_is_vocab_size():
    v = 7
    lm = FixedDistLM([1 / v] * v)
    ids = torch.randint(0, v, (300,), generator=torch.Generator().manual_seed(0))
    r = sliding_window_nll(lm, ids, window=32, stride=16, progress=False)
    assert r.n_tokens == 299
    assert r.ppl == pytest.approx(v, rel=1e-5)


def test_perplexity_of_known_distribution_by_hand():
    probs = [0.5, 0.25, 0.125, 0.125]
    lm = FixedDistLM(probs)
    ids = [0, 1, 2, 3, 0, 0, 1]  # scored: tokens 1..6
    want_nll = -sum(math.log(probs[t]) for t in ids[1:])
    r = sliding_window_nll(lm, ids, window=3, stride=2, progress=False)
    assert r.n_tokens == 6
    assert r.nll_sum == pytest.approx(want_nll, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(want_nll / 6), rel=1e-6)
    assert metrics.perplexity(want_nll, 6) == pytest.approx(r.ppl)


@given(n=st.integers(2, 200), window=st.integers(2, 64), frac=st.floats(0.01, 1.0))
@settings(max_examples=200, deadline=None)
def test_sliding_windows_score_every_token_once(n, window, frac):
    stride = max(1, min(window - 1, round(window * frac)))
    wins = sliding_windows(n, window, stride)
    scored = []
    for b, e, k in wins:
        assert 0 <= b < e <= n and e - b <= window and 1 <= k <= e - b
        scored += list(range(e - k, e))
        # every scored token (but in the first window) has >= window - stride context
        if b > 0:
            assert (e - k) - b >= window - stride
    assert scored == list(range(1, n))


@pytest.mark.parametrize("window,stride,batch", [(2, 1, 1), (5, 2, 3), (16, 15, 2), (64, 7, 4), (200, 100, 2)])
def test_sliding_nll_of_bigram_model_is_exact(window, stride, batch):
    # a bigram LM needs one token of context, so any window >= 2 gives the exact NLL
    lm = BigramLM(11)
    ids = torch.randint(0, 11, (97,), generator=torch.Generator().manual_seed(3)).tolist()
    want = -sum(lm.logprob(a, b) for a, b in zip(ids[:-1], ids[1:]))
    r = sliding_window_nll(lm, ids, window=window, stride=stride, batch_size=batch, progress=False)
    assert r.n_tokens == 96
    assert r.nll_sum == pytest.approx(want, rel=1e-5)


def test_sliding_window_argument_errors():
    with pytest.raises(ValueError, match="window"):
        sliding_windows(10, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_nll(BigramLM(3), [1], window=4, stride=2, progress=False)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_continuation_scores_by_hand_and_padding_invariant(batch):
    lm = BigramLM(9, seed=1)
    pairs = [([1, 2, 3], [4]), ([5], [6, 7, 8]), ([0, 0, 0, 0, 1], [2, 2]), ([3, 3], [3])]
    out = score_token_pairs(lm, pairs, pad_id=0, batch_size=batch, progress=False)
    for (ctx, cont), s in zip(pairs, out):
        seq = ctx + cont
        k = len(cont)
        want = sum(lm.logprob(seq[i - 1], seq[i]) for i in range(len(seq) - k, len(seq)))
        greedy = all(int(lm.table[seq[i - 1]].argmax()) == seq[i] for i in range(len(seq) - k, len(seq)))
        assert s.n_tokens == k
        assert s.logprob == pytest.approx(want, rel=1e-5)
        assert s.greedy == greedy


def test_greedy_flag_true_when_continuation_is_argmax():
    lm = BigramLM(6, seed=2)
    ctx = [3]
    cont = []
    cur = 3
    for _ in range(3):
        cur = int(lm.table[cur].argmax())
        cont.append(cur)
    (s,) = score_token_pairs(lm, [(ctx, cont)], progress=False)
    assert s.greedy


def test_score_token_pairs_errors():
    lm = BigramLM(4)
    with pytest.raises(ValueError, match="continuation is empty"):
        score_token_pairs(lm, [([1], [])], progress=False)
    with pytest.raises(ValueError, match="context is empty"):
        score_token_pairs(lm, [([], [1])], progress=False)


def test_rouge_identical_is_one_and_disjoint_is_zero():
    r = metrics.rouge("the cat sat on the mat", "the cat sat on the mat")
    assert r == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.rouge("", "")["rougeL"] == 1.0  # two empty answers agree
    assert metrics.rouge("", "a cat")["rougeL"] == 0.0
    r = metrics.rouge("alpha beta", "gamma delta")
    assert r == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # stemming: "cats" ~ "cat"; unigram F1 of {cat, sat} vs {cat, sat, down} = 2*1*(2/3)/(1+2/3) = 0.8
    r = metrics.rouge("cats sat", "cat sat down")
    assert r["rouge1"] == pytest.approx(0.8)
    m = metrics.mean_rouge(["a b", "c d"], ["a b", "x y"])
    assert m["rougeL"] == pytest.approx(0.5)
    assert m["rougeL_stderr"] == pytest.approx(0.5)  # std([1,0]) / sqrt(2)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.mean_rouge(["a"], [])


def test_mean_stderr_and_accuracy_by_hand():
    m, se = metrics.mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75
    assert se == pytest.approx(math.sqrt(0.25 / 4))  # sample var = 0.25
    a = metrics.accuracy([True, False])
    assert a == {"acc": 0.5, "acc_stderr": pytest.approx(0.5), "n": 2}
    assert metrics.mean_and_stderr([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        metrics.mean_and_stderr([])
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.perplexity(1.0, 0)
