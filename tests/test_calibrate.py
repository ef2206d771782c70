"""Calibration hits its sparsity target; presets; baselines on the same experts; routers."""

import pytest
import torch

import prunepath
from prunepath import routers
from prunepath.budget import routed_layers
from prunepath.calibrate import measure
from tests.tiny_models import random_ids, tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    m = tiny_model("qwen2", seed=8)
    cfg = prunepath.PrunePathConfig(num_experts=16, router="mlp", router_rank=16, train_tokens=512,
                                    train_seq_len=32, train_epochs=3, train_batch_tokens=128,
                                    kmeans_iters=5)
    return prunepath.convert(m, cfg, calibration=random_ids(16, 32, seed=4), progress=False)


CALIB = random_ids(8, 32, seed=21)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_calibrate_hits_target(model, per_layer, target):
    p = prunepath.calibrate(model, CALIB, target_sparsity=target, per_layer=per_layer)
    assert isinstance(p, list) == per_layer
    got = measure(model, CALIB)["sparsity"]  # the model is left at the found budget
    assert abs(got - target) <= 0.01, (got, target, p)
    if per_layer:
        assert len(p) == 2 and all(0 <= v <= 1 for v in p)


def test_presets_are_stored_and_selectable(model, tmp_path):
    presets = prunepath.calibrate.calibrate_presets(model, CALIB, targets=(0.5, 0.9), per_layer=False,
                                                    progress=False)
    assert set(presets) == {"s50", "s90"}
    assert model.prunepath_config.presets["s50"] == presets["s50"]
    prunepath.set_budget(model, "s90")
    assert abs(measure(model, CALIB)["sparsity"] - 0.9) <= 0.01
    info = model.prunepath_config.router_report["calibration"]["s90"]
    assert info["target_sparsity"] == 0.9 and abs(info["measured_sparsity"] - 0.9) <= 0.01
    prunepath.save(model, tmp_path / "ck")
    loaded = prunepath.from_pretrained(tmp_path / "ck", budget="s50")
    assert abs(measure(loaded, CALIB)["sparsity"] - 0.5) <= 0.01


def test_calibrate_bad_targets(model):
    with pytest.raises(ValueError, match="target_sparsity must lie in"):
        prunepath.calibrate(model, CALIB, target_sparsity=0.99)  # E=16 and min 1 expert: max 0.9375
    with pytest.raises(ValueError, match="target_sparsity"):
        prunepath.calibrate(model, CALIB, target_sparsity="half")
    with pytest.raises(ValueError, match="tokenizer"):
        prunepath.calibrate(model, ["some text"], target_sparsity=0.5)


def test_threshold_and_static_baselines_hit_target(model):
    tau = prunepath.calibrate.calibrate_threshold(model, CALIB, target_sparsity=0.6)
    prunepath.set_routing(model, "threshold", tau=tau)
    assert abs(measure(model, CALIB)["sparsity"] - 0.6) <= 0.02
    keep = prunepath.calibrate.static_keep_masks(model, CALIB, target_sparsity=0.5)
    assert [int(k.sum()) for k in keep] == [8, 8]
    prunepath.set_routing(model, "static", keep=keep)
    assert measure(model, CALIB)["sparsity"] == pytest.approx(0.5)
    prunepath.set_budget(model, 1.0)


def test_per_layer_spends_sparsity_where_estimated_loss_is_lowest():
    """Allocation picks, per layer, the budget minimising cost - lambda * sparsity."""
    from prunepath.calibrate import _allocate

    grid_sp = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    cheap = (grid_sp, torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64))
    costly = (grid_sp, torch.tensor([0.0, 5.0, 10.0], dtype=torch.float64))
    idx_hi, idx_lo, s_hi, s_lo = _allocate([cheap, costly], [64, 64], 0.5)
    assert idx_hi.tolist() == [2, 0] and s_hi == 0.5  # all sparsity in the cheap layer
    idx_hi, idx_lo, s_hi, s_lo = _allocate([cheap, costly], [64, 64], 0.3)
    assert idx_hi.tolist() == [1, 0] or idx_hi.tolist() == [2, 0]
    assert s_lo <= 0.3 <= s_hi


# --- routers -------------------------------------------------------------------------------------
def test_expert_shares_match_brute_force():
    model = tiny_model("llama", seed=2)
    prunepath.convert(model, prunepath.PrunePathConfig(num_experts=4, clustering="none", router="oracle"), progress=False)
    layer = routed_layers(model)[0]
    w = layer.weights()
    x = torch.randn(7, 32)
    h = torch.nn.functional.silu(x @ w.w_gate.T) * (x @ w.w_up.T)
    norms = torch.stack([(h[:, e * 16:(e + 1) * 16] @ w.w_down[:, e * 16:(e + 1) * 16].T).norm(dim=-1)
                         for e in range(4)], -1)
    ref = norms / norms.sum(-1, keepdim=True)
    torch.testing.assert_close(routers.expert_shares(x, w, "silu", 4), ref, atol=1e-5, rtol=1e-4)
    # the oracle router's logits are log shares: it keeps all oracle mass at its own counts
    q = routers.router_quality(layer.router_logits(x), ref)
    assert all(v["mass_kept_vs_oracle"] == pytest.approx(1.0) for v in q.values())


def test_trained_router_beats_chance(model):
    report = model.prunepath_config.router_report
    assert len(report["per_layer"]) == 2
    for entry in report["per_layer"]:
        assert entry["holdout_loss"] >= entry["entropy_target"] - 1e-4  # CE >= entropy of targets
        for p in ("0.5", "0.7", "0.9"):
            q = entry["quality"][p]
            assert 0 < q["mass_kept_vs_oracle"] <= 1 + 1e-6
            assert 1 <= q["active_experts"] <= 16
    assert report["mean"]["0.9"]["active_experts"] > report["mean"]["0.5"]["active_experts"]


def test_router_training_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 12, generator=g)
    true = torch.randn(12, 6, generator=g)
    s = torch.softmax(x @ true, -1)
    r = routers.make_router("linear", 12, 6, seed=0)
    with torch.no_grad():
        before = float(routers.soft_cross_entropy(r(x), s))
    routers.fit_router(r, x, s, epochs=20, batch_tokens=64, lr=2e-2, generator=g)
    after = float(routers.soft_cross_entropy(r(x), s))
    entropy = float(-(s * s.log()).sum(-1).mean())
    assert after < before and after - entropy < 0.1 * (before - entropy)


def test_router_report_function(model):
    rep = prunepath.router_report(model)
    assert rep["per_layer"] and "mean" in rep
    fresh = prunepath.router_report(model, CALIB)
    assert set(fresh["mean"]) == {"0.5", "0.7", "0.9"}


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_batched_router_training_equals_one_at_a_time(kind):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(200, 12, generator=g) for _ in range(3)]
    ss = [torch.softmax(2 * torch.randn(200, 6, generator=g), -1) for _ in range(3)]
    batched = [routers.make_router(kind, 12, 6, 5, seed=i) for i in range(3)]
    single = [routers.make_router(kind, 12, 6, 5, seed=i) for i in range(3)]
    losses = routers.fit_routers(batched, xs, ss, epochs=2, batch_tokens=64, lr=1e-2,
                                 generator=torch.Generator().manual_seed(1))
    for i in range(3):
        loss = routers.fit_router(single[i], xs[i], ss[i], epochs=2, batch_tokens=64, lr=1e-2,
                                  generator=torch.Generator().manual_seed(1))
        assert loss == pytest.approx(losses[i], rel=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(batched[i](xs[i]), single[i](xs[i]), atol=1e-5, rtol=1e-5)
