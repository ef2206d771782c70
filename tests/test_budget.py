"""The budget knob, routing policies, stats, per-sequence budgets and generation under routing."""

import pytest
import torch

import prunepath
from prunepath.budget import routed_layers
from prunepath.convert import wrap
from tests.tiny_models import random_ids, tiny_model

pytest.importorskip("transformers")

E = 8


@pytest.fixture(scope="module")
def trained():
    """A tiny llama with trained MLP routers (E=8 experts of 8 neurons)."""
    model = tiny_model("llama", seed=3)
    cfg = prunepath.PrunePathConfig(num_experts=E, router="mlp", router_rank=16, train_tokens=512,
                                    train_seq_len=32, train_epochs=3, train_batch_tokens=128,
                                    kmeans_iters=5)
    prunepath.convert(model, cfg, calibration=random_ids(16, 32, seed=7), progress=False)
    return model


@pytest.fixture(autouse=True)
def _dense_again(trained):
    yield
    prunepath.set_budget(trained, 1.0)
    prunepath.budget.set_prefill(trained, "routed")


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_sparsity_falls_as_budget_rises(trained):
    ids = random_ids(2, 24)
    seen = []
    for p in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
        prunepath.set_budget(trained, p)
        _logits(trained, ids)
        seen.append(prunepath.stats(trained)["sparsity"])
    assert seen == sorted(seen, reverse=True)
    assert seen[0] == pytest.approx(1 - 1 / E)  # budget 0 keeps min_experts=1
    assert seen[-1] == 0.0


def test_per_layer_budgets(trained):
    ids = random_ids(2, 24)
    prunepath.set_budget(trained, [1.0, 0.3])
    _logits(trained, ids)
    st = prunepath.stats(trained)
    assert st["per_layer"][0] == 0.0 and st["per_layer"][1] > 0.2
    assert st["sparsity"] == pytest.approx(sum(st["per_layer"]) / 2)


def test_per_sequence_budgets_equal_each_sequence_alone(trained):
    ids = random_ids(3, 20, seed=11)
    budgets = torch.tensor([0.3, 1.0, 0.6])
    prunepath.set_budget(trained, budgets)
    batched = _logits(trained, ids)
    for i, p in enumerate(budgets.tolist()):
        prunepath.set_budget(trained, torch.tensor([p]))
        alone = _logits(trained, ids[i:i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
        prunepath.set_budget(trained, p)  # a float budget gives the same as a [1] tensor
        torch.testing.assert_close(_logits(trained, ids[i:i + 1]), alone, atol=1e-5, rtol=1e-5)


def test_per_sequence_budget_batch_mismatch_is_an_error(trained):
    prunepath.set_budget(trained, torch.tensor([0.5, 0.7]))
    with pytest.raises(ValueError, match="per-sequence budget has 2 entries"):
        _logits(trained, random_ids(3, 8))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "nope", [0.5], [0.5, 2.0], True,
                                 torch.tensor([0.5, 1.2]), torch.tensor([[0.5]]),
                                 torch.tensor([1, 0])])
def test_bad_budgets_are_clear_errors(trained, bad):
    before = [layer.budget.clone() for layer in routed_layers(trained)]
    with pytest.raises(ValueError, match="budget|preset"):
        prunepath.set_budget(trained, bad)
    for layer, b in zip(routed_layers(trained), before):  # nothing half-set
        assert torch.equal(layer.budget, b)


def test_budget_context_manager_restores(trained):
    prunepath.set_budget(trained, 0.7)
    with prunepath.budget(trained, 0.2):
        assert all(layer.budget.item() == pytest.approx(0.2) for layer in routed_layers(trained))
    assert all(layer.budget.item() == pytest.approx(0.7) for layer in routed_layers(trained))


def test_setting_a_budget_keeps_the_buffer(trained):
    prunepath.set_budget(trained, 0.5)
    buf = routed_layers(trained)[0].budget
    prunepath.set_budget(trained, 0.8)
    assert routed_layers(trained)[0].budget is buf  # written in place (no recompilation)


def test_routing_policies(trained):
    ids = random_ids(2, 24)
    prunepath.set_routing(trained, "topk", k=3)
    _logits(trained, ids)
    assert prunepath.stats(trained)["sparsity"] == pytest.approx(1 - 3 / E)
    prunepath.set_routing(trained, "static", keep=[0, 5])
    _logits(trained, ids)
    assert prunepath.stats(trained)["per_layer"] == pytest.approx([1 - 2 / E] * 2)
    prunepath.set_routing(trained, "threshold", tau=1.0)  # sigmoid never exceeds 1: nothing kept
    _logits(trained, ids)
    assert prunepath.stats(trained)["sparsity"] == 1.0
    prunepath.set_routing(trained, "threshold", tau=0.0)
    _logits(trained, ids)
    assert prunepath.stats(trained)["sparsity"] == 0.0
    prunepath.set_routing(trained, "dense")
    ref = _logits(trained, ids)
    prunepath.set_routing(trained, "topk", k=E)
    torch.testing.assert_close(_logits(trained, ids), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k must be an int"):
        prunepath.set_routing(trained, "topk", k=E + 1)
    with pytest.raises(ValueError, match="policy must be one of"):
        prunepath.set_routing(trained, "random")
    with pytest.raises(ValueError, match="tau"):
        prunepath.set_routing(trained, "threshold", tau=2.0)
    with pytest.raises(ValueError, match="static keep"):
        prunepath.set_routing(trained, "static", keep=[E])


def test_topk_matches_a_torch_reference(trained):
    x = torch.randn(10, 32)
    layer = routed_layers(trained)[0]
    prunepath.set_routing(trained, "topk", k=2)
    mask = layer.expert_mask(x)
    top = layer.router_logits(x).topk(2).indices
    ref = torch.zeros_like(mask).scatter(1, top, True)
    assert torch.equal(mask, ref)


def test_presets_by_name(trained):
    trained.prunepath_config.presets["half"] = 0.5
    try:
        prunepath.set_budget(trained, "half")
        assert routed_layers(trained)[0].budget.item() == 0.5
        with pytest.raises(ValueError, match="unknown budget preset 'nope'"):
            prunepath.set_budget(trained, "nope")
    finally:
        del trained.prunepath_config.presets["half"]


def test_generate_with_kv_cache_equals_original_at_budget_one():
    model = tiny_model("llama", seed=4)
    prompt = random_ids(2, 6, seed=2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunepath.convert(model, prunepath.PrunePathConfig(num_experts=4, clustering="none"),
                          progress=False)
    assert torch.equal(model.generate(prompt, **kw), ref)
    prunepath.set_budget(model, torch.ones(2))  # routed ops path, all experts
    assert torch.equal(model.generate(prompt, **kw), ref)


def test_generate_routed_cache_equals_no_cache(trained):
    """Routing is per token, so decoding with the KV cache must match full recomputation."""
    prompt = random_ids(1, 6, seed=9)
    prunepath.set_budget(trained, 0.5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = trained.generate(prompt, use_cache=True, **kw)
    ids = prompt
    for _ in range(6):  # recompute everything each step, no cache
        logits = _logits(trained, ids, use_cache=False)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(with_cache, ids)


def test_dense_prefill_is_dense_for_prompts(trained):
    prunepath.budget.set_prefill(trained, "dense")
    prunepath.set_budget(trained, 0.3)
    _logits(trained, random_ids(1, 12))
    assert prunepath.stats(trained)["sparsity"] == 0.0
    _logits(trained, random_ids(1, 1))
    assert prunepath.stats(trained)["sparsity"] > 0.0


def test_stats_cumulative_counts_tokens(trained):
    prunepath.reset_stats(trained)
    prunepath.set_budget(trained, 0.5)
    _logits(trained, random_ids(2, 10))
    _logits(trained, random_ids(1, 5))
    st = prunepath.stats(trained)
    assert st["cumulative"]["tokens"] == 25
    assert 0 < st["cumulative"]["sparsity"] < 1
    assert "router_report" in st and st["router_report"]["per_layer"][0]["quality"]


def test_stats_needs_a_converted_model():
    with pytest.raises(ValueError, match="convert it first"):
        prunepath.stats(tiny_model("llama"))


def test_router_temperature_flattens_the_budget_rule(trained):
    """logits / t: the same ranking, a flatter softmax; t -> large tends to top-k of the budget's
    mean size, and the masks equal ops.route on the divided logits."""
    ids = random_ids(2, 24, seed=5)
    layer = routed_layers(trained)[0]
    x = torch.randn(40, layer.hidden_size, generator=torch.Generator().manual_seed(2))
    prunepath.set_budget(trained, 0.6)
    try:
        counts = {}
        for t in (1.0, 3.0):
            prunepath.set_router_temperature(trained, t)
            assert trained.prunepath_config.router_temperature == t
            with torch.no_grad():
                raw = layer.router(x)
                mask = layer.expert_mask(x)
            ref = prunepath.ops.route(raw / t, 0.6, backend="torch")
            assert torch.equal(mask, ref)
            counts[t] = mask.sum(-1).float()
            _logits(trained, ids)  # the whole model runs with it
        # a flatter softmax needs at least as many experts to reach the same mass for every token
        assert bool((counts[3.0] >= counts[1.0]).all()) and counts[3.0].std() <= counts[1.0].std() + 1e-6
    finally:
        prunepath.set_router_temperature(trained, 1.0)


def test_router_temperature_drops_stale_presets_and_checks_its_value(trained):
    prunepath.calibrate(trained, random_ids(4, 32, seed=9), target_sparsity=0.4, name="s40", tol=0.05)
    assert "s40" in trained.prunepath_config.presets
    with pytest.warns(UserWarning, match="dropping the presets"):
        prunepath.set_router_temperature(trained, 2.0)
    assert trained.prunepath_config.presets == {}
    prunepath.set_router_temperature(trained, 1.0)
    for bad in (0.0, -1.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="temperature"):
            prunepath.set_router_temperature(trained, bad)
    with pytest.raises(ValueError, match="router_temperature"):
        prunepath.PrunePathConfig(router_temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_to_dtype_keeps_budget_and_counters_exact(dtype):
    # model.to(dtype) converts every floating buffer; the budget and statistics must not be
    # rounded (0.564 is 0.5625 in bf16) and the counters must keep counting past 256 tokens
    model = tiny_model("llama", seed=5)
    wrap(model, prunepath.PrunePathConfig(num_experts=E, clustering="none", router="linear"))
    prunepath.set_budget(model, 0.564)
    model.to(dtype)
    layer = routed_layers(model)[0]
    assert layer.base.up_proj.weight.dtype == dtype and next(layer.router.parameters()).dtype == dtype
    assert layer.budget.dtype == torch.float32 and float(layer.budget) == pytest.approx(0.564)
    assert layer.active_sum.dtype == layer.token_count.dtype == torch.float64
    with torch.no_grad():
        model(random_ids(3, 100, seed=6))
    assert prunepath.stats(model)["cumulative"]["tokens"] == 300


def test_routing_settings_one_object_validated_when_set(trained):
    from prunepath.layers import RoutingSettings

    layer = routed_layers(trained)[0]
    own = layer.settings
    assert isinstance(own, RoutingSettings) and own.policy == "budget" and 1 <= own.topk <= E
    old = layer.configure(policy="topk", topk=3)
    assert old is own and layer.settings.policy == "topk" and layer.topk == 3
    layer.configure(old)
    assert layer.settings is own
    with pytest.raises(ValueError, match="k must be"):
        layer.configure(topk=E + 1)
    with pytest.raises(ValueError, match="policy"):
        layer.policy = "sometimes"  # the attributes set through configure too
    with pytest.raises(ValueError, match="temperature"):
        layer.configure(temperature=0.0)
    with pytest.raises(TypeError, match="unknown routing setting"):
        layer.configure(polcy="dense")
    assert layer.settings is own  # a rejected change leaves the settings alone
    with pytest.raises(ValueError):
        layer.set_budget(1.5)
    with pytest.raises(ValueError):
        layer.set_budget(torch.tensor([0.5, 2.0]))
    layer.set_budget(0.25)
    assert float(layer.budget) == 0.25 and not layer._dense_budget
    # a snapshot restores settings and budgets; the decoder leaves the settings as they were
    with prunepath.budget.routing_state(trained, "topk", k=2):
        assert all(m.settings.policy == "topk" for m in routed_layers(trained))
    assert layer.settings == own and float(layer.budget) == 0.25
    prunepath.set_budget(trained, 0.5)
    before = [m.settings for m in routed_layers(trained)]
    prunepath.generate(trained, random_ids(1, 4), 3, eos_token_id=[], record_stats=False)
    assert [m.settings for m in routed_layers(trained)] == before
    prunepath.decode.restore(trained)
