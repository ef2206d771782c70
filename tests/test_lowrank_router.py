"""LowRankRouter: closed-form fit against a plain SVD reference, full rank = the true shares,
refinement lowers its loss, conversion + checkpoint round trip on every family."""

import math

import pytest
import torch

import prunepath
from prunepath.families import FFNWeights
from prunepath.routers import (
    LowRankRouter,
    expert_shares,
    make_router,
    neuron_activations,
    refine_lowrank,
)

from .tiny_models import FAMILIES, random_ids, tiny_model


def _ffn(d, f, gated, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    return FFNWeights(
        w_gate=torch.randn(f, d, generator=g) / math.sqrt(d) if gated else None,
        w_up=torch.randn(f, d, generator=g) / math.sqrt(d),
        w_down=torch.randn(d, f, generator=g) / math.sqrt(f) * (1 + torch.rand(f, generator=g)),
        b_up=torch.randn(f, generator=g) * 0.1 if bias else None,
        b_down=None,
    )


def _inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    # correlated, anisotropic inputs with a mean, like a transformer's hidden states
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(0)
    return torch.randn(n, d, generator=g) @ mix.T + torch.randn(d, generator=g)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("d,f,e", [(24, 40, 40), (24, 40, 8), (17, 33, 11)])
def test_full_rank_fit_predicts_the_true_shares(gated, d, f, e):
    w = _ffn(d, f, gated, seed=d + f + e, bias=not gated)
    x = _inputs(512, d, seed=3)
    r = LowRankRouter(d, e, rank=d, intermediate_size=f, gated=gated, activation="silu")
    r.fit_to_ffn(x, w)
    xt = _inputs(64, d, seed=4)
    h = neuron_activations(xt, w, "silu").abs() * w.w_down.norm(dim=0)
    want = h.reshape(64, e, -1).sum(-1)
    torch.testing.assert_close(r(xt).exp(), want, rtol=2e-3, atol=1e-5)
    if e == f:  # one neuron per expert: the predicted distribution is the oracle's
        torch.testing.assert_close(torch.softmax(r(xt), -1), expert_shares(xt, w, "silu", e),
                                   rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_closed_form_is_the_best_rank_r_map(gated):
    d, f, rank = 32, 48, 6
    w = _ffn(d, f, gated, seed=7)
    x = _inputs(2000, d, seed=8).double()
    r = LowRankRouter(d, f, rank=rank, intermediate_size=f, gated=gated)
    r.fit_to_ffn(x, w)
    m = (w.w_up if w.w_gate is None else torch.cat([w.w_gate, w.w_up])).double()
    approx = r.proj_out.weight.double() @ r.proj_in.weight.double()
    err = ((x @ (m - approx).T) ** 2).sum(-1).mean()
    # reference: truncated SVD of M C^{1/2} (C = E[x x^T] via Cholesky of the data), mapped back
    c = x.T @ x / x.shape[0]
    chol = torch.linalg.cholesky(c)
    u, s, vh = torch.linalg.svd(m @ chol)
    best = (s[rank:] ** 2).sum()
    assert float(err) == pytest.approx(float(best), rel=1e-4)
    # and it beats the plain (data-blind) truncated SVD of M
    u2, s2, vh2 = torch.linalg.svd(m)
    blind = (u2[:, :rank] * s2[:rank]) @ vh2[:rank]
    assert float(err) < float(((x @ (m - blind).T) ** 2).sum(-1).mean())


def test_refine_lowers_the_loss_and_freezes_params():
    d, f = 24, 64
    w = _ffn(d, f, True, seed=11)
    x = _inputs(1024, d, seed=12)
    r = LowRankRouter(d, f, rank=4, intermediate_size=f)
    r.fit_to_ffn(x, w)
    before = refine_lowrank(r, x, w, epochs=0, batch_tokens=256, lr=1e-3)
    after = refine_lowrank(r, x, w, epochs=6, batch_tokens=128, lr=3e-3,
                           generator=torch.Generator().manual_seed(0))
    assert math.isnan(before)
    target = neuron_activations(x, w, "silu") * w.w_down.norm(dim=0)
    with torch.no_grad():
        closed = LowRankRouter(d, f, rank=4, intermediate_size=f)
        closed.fit_to_ffn(x, w)

        def loss(router):
            z = router.proj_out(router.proj_in(x))
            h = torch.nn.functional.silu(z[:, :f]) * z[:, f:]
            return float(((h * router.down_norm - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean())

    assert loss(r) < loss(closed)
    assert after == pytest.approx(loss(r), rel=0.5)
    assert not any(p.requires_grad for p in r.parameters())


def test_make_router_needs_the_ffn_width():
    with pytest.raises(ValueError, match="intermediate_size"):
        make_router("lowrank", 16, 4, 8)
    with pytest.raises(ValueError, match="not divisible"):
        make_router("lowrank", 16, 5, 8, intermediate_size=32)
    r = make_router("lowrank", 16, 4, 64, intermediate_size=32, gated=False, activation="gelu")
    assert r.proj_in.out_features == 16  # rank capped at d
    assert r.proj_out.out_features == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_save_load_every_family(family, tmp_path):
    model = tiny_model(family)
    ids = random_ids(8, 32)
    cfg = prunepath.PrunePathConfig(num_experts=8, clustering="none", router="lowrank", router_rank=8,
                                    train_tokens=256, train_seq_len=32, train_epochs=1,
                                    train_batch_tokens=64)
    prunepath.convert(model, cfg, calibration=ids, progress=False)
    report = model.prunepath_config.router_report
    assert report["router"] == "lowrank"
    assert 0 < report["router_cost"]["router_over_ffn"] < 1
    assert 0.5 < report["mean"]["0.5"]["mass_kept_vs_oracle"] <= 1.0 + 1e-6
    prunepath.set_budget(model, 0.5)
    with torch.no_grad():
        want = model(ids[:2]).logits
    model.save_pretrained(tmp_path / "ckpt")
    back = prunepath.from_pretrained(tmp_path / "ckpt", budget=0.5)
    with torch.no_grad():
        got = back(ids[:2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family,mode", [("llama", "compile"), ("gpt2", "eager")])
def test_decoder_tokens_equal_hf_generate(family, mode):
    """The default recipe (one neuron per expert, low-rank routers) through the fast decoder."""
    model = tiny_model(family, seed=6)
    prunepath.convert(model, calibration=random_ids(8, 32, seed=7), progress=False,
                      router_rank=8, train_tokens=256, train_seq_len=32, train_epochs=1,
                      train_batch_tokens=64)
    assert model.prunepath_config.num_experts == model.prunepath_config.intermediate_size
    prunepath.set_budget(model, 0.5)
    ids = random_ids(2, 6, seed=8)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert prunepath.stats(model)["sparsity"] > 0.2
    out = prunepath.generate(model, ids, 8, eos_token_id=[], mode=mode)
    assert torch.equal(out, ref)
