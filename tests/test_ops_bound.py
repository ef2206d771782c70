"""Bound ops (prunepath.ops.bind_*) against the public ops, and frozen routed layers."""

import pytest
import torch

import prunepath
from prunepath import ops
from prunepath.decode import routed_layers
from prunepath.layers import frozen

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in ops.available_backends("cpu")]  # triton: interpreted


def _ffn(d, f, dtype, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(dtype)  # noqa: E731
    return dict(w_gate=r(f, d) if gated else None, w_up=r(f, d), w_down=r(d, f),
                b_up=r(f) if bias else None, b_down=r(d) if bias else None)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,d,f,e,gated,bias", [(1, 24, 60, 6, True, False), (5, 17, 45, 9, False, True),
                                                (8, 32, 96, 12, True, True)])
def test_bound_routed_ffn_equals_routed_ffn(backend, dtype, t, d, f, e, gated, bias):
    w = _ffn(d, f, dtype, gated, bias)
    act = "silu" if gated else "gelu"
    bound = ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"], activation=act, b_up=w["b_up"],
                                b_down=w["b_down"], backend=backend)
    for step in range(3):  # fresh inputs each call, same bound op
        x = torch.randn(t, d).to(dtype)
        mask = torch.rand(t, e) < (0.2 + 0.3 * step)
        want = ops.routed_ffn(x, w["w_gate"], w["w_up"], w["w_down"], mask, activation=act,
                              b_up=w["b_up"], b_down=w["b_down"], backend=backend)
        torch.testing.assert_close(bound(x, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("t", [1, 3, 9])
def test_bound_router_route_equals_router_route(backend, low_rank, t):
    g = torch.Generator().manual_seed(t)
    d, e, r = 20, 10, 6
    w1 = torch.randn(r if low_rank else e, d, generator=g)
    b1 = torch.randn(w1.shape[0], generator=g)
    w2, b2 = (torch.randn(e, r, generator=g), torch.randn(e, generator=g)) if low_rank else (None, None)
    bound = ops.bind_router_route(w1, b_router=b1, w_router_out=w2, b_router_out=b2, min_experts=1,
                                  backend=backend)
    for budget in (0.0, 0.37, torch.rand(t, generator=g), 1.0):
        x = torch.randn(t, d, generator=g)
        want = ops.router_route(x, w1, budget, b_router=b1, w_router_out=w2, b_router_out=b2,
                                min_experts=1, backend=backend)
        assert torch.equal(bound(x, budget), want)


def test_bound_ops_see_in_place_weight_updates():
    w = _ffn(16, 32, torch.float32)
    bound = ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"])
    x, mask = torch.randn(2, 16), torch.ones(2, 4, dtype=torch.bool)
    before = bound(x, mask)
    w["w_down"].mul_(2)
    torch.testing.assert_close(bound(x, mask), 2 * before)


def test_bound_ops_reject_bad_inputs_naming_the_argument():
    w = _ffn(16, 32, torch.float32)
    with pytest.raises(ValueError, match="w_down must have shape"):
        ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"].t())
    with pytest.raises(ValueError, match="activation"):
        ops.bind_routed_ffn(None, w["w_up"], w["w_down"], activation="swish")
    with pytest.raises(ValueError, match="w_gate has dtype"):
        ops.bind_routed_ffn(w["w_gate"].double(), w["w_up"], w["w_down"])
    with pytest.raises(ValueError, match="backend"):
        ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"], backend="nope")
    bound = ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"])
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x must have shape \[T, d=16\]"):
        bound(torch.randn(2, 15), mask)
    with pytest.raises(ValueError, match="x has dtype"):
        bound(torch.randn(2, 16).double(), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[T=3"):
        bound(torch.randn(3, 16), mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        bound(torch.randn(2, 16), mask.float())
    with pytest.raises(ValueError, match="divisible"):
        bound(torch.randn(2, 16), torch.ones(2, 5, dtype=torch.bool))
    router = ops.bind_router_route(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"x must have shape \[T, d=16\]"):
        router(torch.randn(2, 8), 0.5)
    with pytest.raises(ValueError, match="budget"):
        router(torch.randn(2, 16), 1.5)
    with pytest.raises(ValueError, match="budget values must lie"):
        router(torch.randn(2, 16), torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="w_router_out must have shape"):
        ops.bind_router_route(torch.randn(4, 16), w_router_out=torch.randn(6, 5))
    with pytest.raises(ValueError, match="max_experts"):
        ops.bind_router_route(torch.randn(4, 16), max_experts=9)


def test_bound_routed_ffn_is_differentiable_under_autograd():
    w = {k: (v.requires_grad_() if v is not None else None) for k, v in _ffn(16, 32, torch.float32).items()}
    bound = ops.bind_routed_ffn(w["w_gate"], w["w_up"], w["w_down"], backend="auto")
    x, mask = torch.randn(3, 16), torch.rand(3, 4) < 0.5
    bound(x, mask).square().sum().backward()
    grad = w["w_up"].grad.clone()
    w["w_up"].grad = None
    ops.routed_ffn(x, w["w_gate"], w["w_up"], w["w_down"], mask, backend="torch").square().sum().backward()
    torch.testing.assert_close(grad, w["w_up"].grad)


# ------------------------------------------------------------------- frozen routed layers

def _model(router="mlp"):
    from tests.eval_tiny import tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer())
    cfg = prunepath.PrunePathConfig(num_experts=8, router=router, router_rank=8, backend="auto")
    return prunepath.convert(model, cfg, torch.randint(0, 50, (4, 32)), progress=False)


@pytest.mark.parametrize("router", ["mlp", "linear"])
def test_frozen_layers_give_the_same_logits_and_see_setting_changes(router):
    model = _model(router)
    layers = routed_layers(model)
    ids = torch.randint(0, 50, (2, 7))
    settings = [lambda: prunepath.set_budget(model, 0.4), lambda: prunepath.set_budget(model, [0.2, 0.9]),
                lambda: prunepath.set_budget(model, 0.7), lambda: prunepath.set_routing(model, "topk", k=3),
                lambda: prunepath.set_routing(model, "threshold", tau=0.3),
                lambda: prunepath.set_budget(model, 1.0)]
    want = []
    with torch.no_grad():
        for s in settings:
            s()
            want.append(model(ids).logits)
        for layer in layers:
            layer._bound = None
        with frozen(layers):  # the same changes made inside one block
            for s, w in zip(settings, want):
                s()
                torch.testing.assert_close(model(ids).logits, w, rtol=0, atol=0)
            assert any(m._bound is not None for m in layers)
    assert all(not m._frozen and m._bound is None for m in layers)


def test_frozen_layers_use_the_bound_path():
    model = _model()
    layers = routed_layers(model)
    prunepath.set_budget(model, 0.5)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad(), frozen(layers):
        model(ids)
        bound = [m._bound for m in layers]
        model(ids)  # reused, not rebuilt
        # bound router and FFN; no router_routed_ffn while fuse_routing is off
        assert all(b is not None and None not in b[1][:2] and b[1][2] is None for b in bound)
        assert [m._bound for m in layers] == bound
        want = model(ids).logits
        for m in layers:
            m.fuse_routing = True
        got = model(ids).logits  # rebound: the two as one router_routed_ffn
        assert all(isinstance(m._bound[1][2], prunepath.ops.BoundRouterRoutedFFN) for m in layers)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
