"""RoutedFFN's fused router (ops.router_route on folded weights) against the unfused path.

The fused path folds the router's input standardisation into its first layer and
1/temperature into its last, and computes the logits in fp32. Masks must equal the unfused
path (router module -> logits / T -> ops.route) for every token whose decision is not within
rounding of a tie: tokens whose cumulative mass lies within 1e-4 of the budget, or whose
sorted probabilities are within 1e-6 of each other at the cut, are left out (and must be
few).
"""

import copy

import pytest
import torch

import prunepath
from prunepath.budget import routed_layers
from prunepath.convert import wrap
from prunepath.routers import LinearRouter, MLPRouter, OracleRouter

from .tiny_models import tiny_model


def routed_model(router, seed=0, experts=8):
    model = tiny_model("llama", seed)
    wrap(model, prunepath.PrunePathConfig(num_experts=experts, clustering="none", router=router,
                                          router_rank=6, seed=seed))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial standardisation and biases (the folds must matter)
        for layer in routed_layers(model):
            r = layer.router
            r.in_mean.copy_(torch.randn(r.in_mean.shape, generator=gen))
            r.in_inv_std.copy_(torch.rand(r.in_inv_std.shape, generator=gen) * 2 + 0.2)
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def reference_probs(layer, x):
    """fp64 softmax of the unfused router's logits / T (the decision the masks implement)."""
    r = copy.deepcopy(layer.router).double()
    with torch.no_grad():
        return torch.softmax(r(x.double()) / layer.temperature, -1)


def robust_tokens(probs, policy, budget=None, k=None, mass_eps=1e-4, gap_eps=1e-6):
    """Tokens whose mask cannot flip under fp32 rounding."""
    sp = probs.sort(-1, descending=True).values
    gaps = sp[:, :-1] - sp[:, 1:]  # a near-tie only matters at the cut
    if policy == "topk":
        return gaps[:, k - 1] > gap_eps if k < sp.shape[-1] else torch.ones_like(sp[:, 0], dtype=torch.bool)
    before = sp.cumsum(-1) - sp
    count = (before < budget).sum(-1).clamp(1, sp.shape[-1])
    far = ((before - budget).abs() > mass_eps).all(-1)
    at_cut = gaps.gather(-1, (count - 1).clamp(max=gaps.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return far & ((at_cut > gap_eps) | (count == sp.shape[-1]))


def masks(layer, x, batch, fused):
    layer.fuse_router = fused
    try:
        return layer.expert_mask(x, batch)
    finally:
        layer.fuse_router = True


@pytest.mark.parametrize("router", ["linear", "mlp"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_mask_equals_unfused(router, temperature, backend):
    model = routed_model(router, seed=3)
    prunepath.budget.set_router_temperature(model, temperature)
    prunepath.budget.set_backend(model, backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(301, 32, generator=gen) * 1.5 + 0.3
    checked = 0
    for layer in routed_layers(model):
        probs = reference_probs(layer, x)
        for budget in (0.05, 0.3, 0.6, 0.9, 0.99):
            prunepath.set_budget(model, budget)
            ok = robust_tokens(probs, "budget", budget=budget)
            assert ok.float().mean() > 0.9
            fused, unfused = masks(layer, x, None, True), masks(layer, x, None, False)
            assert torch.equal(fused[ok], unfused[ok])
            checked += int(ok.sum())
        for k in (1, 3, 8):
            prunepath.set_routing(model, "topk", k=k)
            ok = robust_tokens(probs, "topk", k=k)
            fused, unfused = masks(layer, x, None, True), masks(layer, x, None, False)
            assert torch.equal(fused[ok], unfused[ok])
            assert fused.sum(-1).eq(k).all()
    assert checked > 2000


def test_fused_triton_kernel_mask_equals_unfused():
    # the fused Triton kernel (what a GPU runs; here the interpreter) on the folded weights
    from prunepath.ops.backends import supports_device

    if not supports_device("triton", torch.device("cpu")):
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    model = routed_model("mlp", seed=10)
    prunepath.budget.set_router_temperature(model, 2.0)
    prunepath.budget.set_backend(model, "triton")
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(11))
    layer = routed_layers(model)[1]
    probs = reference_probs(layer, x)
    for budget in (0.3, 0.8):
        prunepath.set_budget(model, budget)
        ok = robust_tokens(probs, "budget", budget=budget)
        assert ok.float().mean() > 0.8
        fused, unfused = masks(layer, x, None, True), masks(layer, x, None, False)
        assert torch.equal(fused[ok], unfused[ok])


def test_fused_path_skips_the_router_module_and_per_sequence_budgets():
    model = routed_model("mlp", seed=4)
    layer = routed_layers(model)[0]
    calls = []
    layer.router.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(6, 32)
    prunepath.set_budget(model, torch.tensor([0.2, 0.9]))  # one budget per sequence (B=2)
    fused = layer.expert_mask(x, 2)
    assert not calls  # the router module did not run: the fused op did
    unfused = masks(layer, x, 2, False)
    assert calls
    probs = reference_probs(layer, x)
    ok = robust_tokens(probs[:3], "budget", budget=0.2) & True
    ok = torch.cat([ok, robust_tokens(probs[3:], "budget", budget=0.9)])
    assert torch.equal(fused[ok], unfused[ok])
    assert fused[:3].sum() < fused[3:].sum()


def test_fold_cache_follows_router_changes():
    model = routed_model("mlp", seed=5)
    layer = routed_layers(model)[0]
    prunepath.set_budget(model, 0.5)
    a = layer.fused_router(torch.float32)
    assert layer.fused_router(torch.float32) is a  # cached: no work per call
    w1_ptr = a[0].data_ptr()
    x = torch.randn(64, 32)
    with torch.no_grad():  # an in-place update refolds into the same tensors
        layer.router.fc2.weight.mul_(-3.0)
        layer.router.in_mean.add_(0.5)
    b = layer.fused_router(torch.float32)
    assert b is a and b[0].data_ptr() == w1_ptr
    probs = reference_probs(layer, x)
    ok = robust_tokens(probs, "budget", budget=0.5)
    assert torch.equal(masks(layer, x, None, True)[ok], masks(layer, x, None, False)[ok])
    prunepath.budget.set_router_temperature(model, 3.0)  # new temperature: new fold
    c = layer.fused_router(torch.float32)
    assert c is not a
    torch.testing.assert_close(c[2], layer.router.fc2.weight / 3.0)
    layer.router = copy.deepcopy(layer.router)  # a new router object: new fold
    assert layer.fused_router(torch.float32) is not c
    d = layer.fused_router(torch.float64)  # another input dtype: w1 in that dtype
    assert d[0].dtype == torch.float64 and d[2].dtype == torch.float32


def test_unfusable_routers_and_threshold_keep_the_unfused_path():
    model = routed_model("linear", seed=6)
    layer = routed_layers(model)[0]

    class Custom(LinearRouter):  # a subclass may change forward: never folded
        def forward(self, x):
            return -super().forward(x)

    custom = Custom(32, 8)
    custom.load_state_dict(layer.router.state_dict())
    layer.router = custom
    assert layer.fused_router() is None
    x = torch.randn(20, 32)
    prunepath.set_budget(model, 0.4)
    ref = prunepath.ops.route(custom(x), 0.4, backend="torch")
    assert torch.equal(layer.expert_mask(x), ref)
    layer.router = OracleRouter()
    assert layer.fused_router() is None
    layer.router = MLPRouter(32, 8, 4)
    layer.fuse_router = False
    assert layer.fused_router() is None
    layer.fuse_router = True
    prunepath.set_routing(model, "threshold", tau=0.5)
    mask = layer.expert_mask(x)
    assert torch.equal(mask, torch.sigmoid(layer.router_logits(x)) > 0.5)


def test_fused_model_forward_matches_unfused():
    model = routed_model("mlp", seed=8)
    prunepath.set_budget(model, 0.5)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        fused = model(ids).logits
        for layer in routed_layers(model):
            layer.fuse_router = False
        unfused = model(ids).logits
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fused_router_bf16_on_gpu_matches_the_fp64_rule(backend):
    # bf16 model: the fused path computes fp32 logits from bf16 x and bf16 folded weights;
    # its masks must equal the rule applied to fp64 logits wherever rounding cannot flip them
    model = routed_model("mlp", seed=12).cuda().to(torch.bfloat16)
    prunepath.budget.set_router_temperature(model, 2.0)
    prunepath.budget.set_backend(model, backend)
    x = (torch.randn(257, 32, generator=torch.Generator().manual_seed(13)) * 1.5).cuda()
    x = x.to(torch.bfloat16)
    for layer in routed_layers(model):
        probs = reference_probs(layer, x).cpu()
        for budget in (0.3, 0.6, 0.9):
            prunepath.set_budget(model, budget)
            mask = layer.expert_mask(x).cpu()
            ok = robust_tokens(probs, "budget", budget=budget, mass_eps=1e-2, gap_eps=2e-3)
            ref = prunepath.ops.route(probs.log(), budget, backend="torch")
            # the same folded weights through the torch backend (fp32 logits, plain route)
            w1, b1, w2, b2, act = layer.fused_router(x.dtype)
            plain = prunepath.ops.router_route(x, w1, budget, b_router=b1, w_router_out=w2,
                                               b_router_out=b2, hidden_activation=act,
                                               backend="torch").cpu()
            bad = (mask != ref).any(-1) & ok
            msg = (f"layer {layer.layer_idx} budget {budget}: {int(bad.sum())} of "
                   f"{int(ok.sum())} robust tokens differ from the fp64 rule; "
                   f"{int((mask != plain).any(-1).sum())} of {len(mask)} differ from the torch "
                   f"backend on the same folded weights")
            assert ok.float().mean() > 0.5, msg
            assert not bad.any(), msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_router_triton_equals_torch_backend_across_shapes():
    # what RoutedFFN's fused path hands the kernel (bf16 x and first layer, fp32 rest), at
    # tiny and Llama-3-8B router shapes; both backends compute fp32 logits, so masks may
    # differ only at fp32 near-ties (a few tokens at most)
    gen = torch.Generator().manual_seed(14)
    report, worst = [], 0.0
    for d, r, e, t in ((32, 6, 8, 257), (32, 6, 8, 16), (32, 16, 8, 257), (32, None, 8, 257),
                       (4096, 64, 64, 1), (4096, 64, 64, 4), (4096, 64, 64, 257)):
        x = torch.randn(t, d, generator=gen).cuda().bfloat16()
        w1 = (torch.randn(r or e, d, generator=gen) / d**0.5).cuda().bfloat16()
        b1 = torch.randn(r or e, generator=gen).cuda()
        w2 = None if r is None else (torch.randn(e, r, generator=gen) * 0.5).cuda()
        b2 = None if r is None else torch.randn(e, generator=gen).cuda()
        act = "none" if r is None else "gelu"
        masks = [prunepath.ops.router_route(x, w1, 0.5, b_router=b1, w_router_out=w2,
                                            b_router_out=b2, hidden_activation=act, backend=b)
                 for b in ("triton", "torch")]
        bad = int((masks[0] != masks[1]).any(-1).sum())
        report.append(f"d={d} R={r} E={e} T={t}: {bad} of {t} tokens differ")
        worst = max(worst, bad / t)
    assert worst <= 0.02, "; ".join(report)


def test_traced_mask_ignores_a_stale_fold():
    # under torch.compile the cache is used only if it was made for this router object,
    # dtype and temperature; otherwise the fold is traced into the step
    model = routed_model("mlp", seed=15)
    layer = routed_layers(model)[0]
    prunepath.set_budget(model, 0.5)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(16))
    eager = masks(layer, x, None, True)  # makes the cache (and the ops' backend choices)
    torch._dynamo.reset()
    traced = torch.compile(lambda v: layer.expert_mask(v), backend="eager", fullgraph=True)
    assert torch.equal(traced(x), eager)
    new = copy.deepcopy(layer.router)
    with torch.no_grad():
        new.fc2.weight.mul_(-2.0)
    layer.router = new  # no eager call: the cached fold is stale
    probs = reference_probs(layer, x)
    ok = robust_tokens(probs, "budget", budget=0.5)
    assert torch.equal(traced(x)[ok], masks(layer, x, None, False)[ok])
    torch._dynamo.reset()
