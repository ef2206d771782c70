"""prunepath.decode.stacked_ffn: W_gate, W_up (and a routed layer's folded router) in one storage; the
lean step's one up product and the masked-dense path's one GEMM with routing in the kernel."""

import pytest
import torch

import prunepath
from prunepath.decode import stacked_ffn
from prunepath.convert import wrap
from prunepath.decode import Decoder
from prunepath.layers import RoutedFFN

from .test_decode import NEW, hf_greedy, prompts, routed
from .tiny_models import tiny_model


def routed_layers(model):
    return [m for m in model.modules() if isinstance(m, RoutedFFN)]


@pytest.mark.parametrize("router", ["linear", "mlp"])
def test_stack_keeps_values_and_parameters_and_unstack_undoes_it(router):
    model = tiny_model("llama", seed=1)
    wrap(model, prunepath.PrunePathConfig(num_experts=4, clustering="none", router=router, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    n = len(model.model.layers)
    assert stacked_ffn.stack(model) == n and stacked_ffn.stacked_count(model) == n
    assert stacked_ffn.stack(model) == 0
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_parameters()) == params
    for layer in routed_layers(model):
        w1 = layer.fused_router(torch.float32)[0]
        assert w1.data_ptr() == layer.router_rows.data_ptr()  # folded into the stacked rows
        mlp = layer.base
        joint = prunepath.ops.stacked(mlp.gate_proj.weight, mlp.up_proj.weight, w1)
        assert joint is not None and joint.shape[0] == 2 * layer.intermediate_size + w1.shape[0]
        assert layer.stacked_views()[1] is not None
    assert stacked_ffn.unstack(model) == n and stacked_ffn.stacked_count(model) == 0
    assert all(layer.router_rows is None for layer in routed_layers(model))


def test_refold_writes_the_stacked_rows():
    model = routed("llama", seed=3)
    stacked_ffn.stack(model)
    layer = routed_layers(model)[0]
    w1 = layer.fused_router(torch.float32)[0].clone()
    with torch.no_grad():
        layer.router.proj.weight.mul_(3)
    again = layer.fused_router(torch.float32)[0]
    assert again.data_ptr() == layer.router_rows.data_ptr()
    torch.testing.assert_close(again, 3 * w1)


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("budget", [None, 0.5])
def test_lean_decode_with_stacked_ffn_matches_hf(budget, mode):
    """Dense: the lean step's one up product; routed at 0.5 on the masked-dense path: one GEMM
    for g, u and the router, the routing in the activation step -- the tokens of HF's forward."""
    model = tiny_model("llama", seed=2) if budget is None else routed("llama", seed=2)
    ids, mask = prompts(3, 6, seed=3, padded=True)
    if budget is not None:
        dense_ref = hf_greedy(model, ids, attention_mask=mask)
        prunepath.set_budget(model, budget)
    ref = hf_greedy(model, ids, attention_mask=mask)
    if budget is not None:
        assert not torch.equal(ref, dense_ref), "the budget must change the tokens here"
    dec = Decoder(model, 3, 6 + NEW, mode=mode, stack_ffn=True,
                  ffn_path="dense" if budget else "auto")
    assert stacked_ffn.stacked_count(model) == len(model.model.layers)
    if budget is None:
        assert all(t is not None for t in dec.lean.gate_up)
    calls = []
    orig = prunepath.ops.router_masked_dense_ffn
    prunepath.ops.router_masked_dense_ffn = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        out = dec.generate(ids, NEW, attention_mask=mask, eos_token_id=[])
    finally:
        prunepath.ops.router_masked_dense_ffn = orig
    assert torch.equal(out, ref)
    assert bool(calls) == (budget is not None)
    assert torch.equal(hf_greedy(model, ids, attention_mask=mask), ref)  # HF's forward too
