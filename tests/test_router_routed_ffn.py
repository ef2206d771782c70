"""prunepath.ops.router_routed_ffn (routing + routed FFN as one op) against the two ops."""

import pytest
import torch

from prunepath import ops
from prunepath.ops.reference import route_reference, routed_ffn_reference
from prunepath.ops.router_route import router_logits_reference

from .helpers import assert_close_rel, assert_mask_equal_up_to_rounding

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in ops.available_backends("cpu")]
_gpu = [pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (device, backend); the cpu "triton" backend is the interpreter (TRITON_INTERPRET=1)
CASES = [("cpu", b) for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, marks=_gpu, id=f"cuda-{b}") for b in ("triton", "torch")]


def _case(t, d, f, e, dtype, *, low_rank, gated, bias, packed, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, k=0.1: (torch.randn(*s, generator=g) * k).to(dtype)  # noqa: E731
    rank = 6 if low_rank else e
    router = dict(w_router=r(rank, d, k=d**-0.5 * 3),
                  b_router=torch.randn(rank, generator=g) if bias or not low_rank else None,
                  w_router_out=torch.randn(e, rank, generator=g) * rank**-0.5 * 3 if low_rank else None,
                  b_router_out=torch.randn(e, generator=g) if low_rank and bias else None,
                  hidden_activation="gelu" if low_rank else "none")
    w_down = r(f, d).t() if packed else r(d, f)  # packed: the transposed view of W_down^T
    ffn = dict(w_gate=r(f, d) if gated else None, w_up=r(f, d), w_down=w_down,
               b_up=r(f) if bias else None, b_down=r(d) if bias else None,
               activation="silu" if gated else "gelu")
    x = torch.randn(t, d, generator=g).to(dtype)
    to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return (x.to(device), {k: to(v) for k, v in router.items()},
            {k: to(v) for k, v in ffn.items()})


def _budgets(t, g):
    b = torch.rand(t, generator=g)
    b[0] = 0.0
    if t > 1:
        b[-1] = 1.0
    return [0.0, 0.45, 1.0, b]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,d,f,e,low_rank,gated,bias,packed", [
    (1, 24, 60, 6, True, True, False, True),     # a decode token, low-rank router, packed W_down
    (2, 17, 45, 9, False, False, True, False),   # odd d, non-gated, biases, nn.Linear W_down
    (5, 32, 96, 12, True, True, True, False),    # a few tokens, biases everywhere
    (1, 40, 600, 300, False, True, False, True),  # E = 300 (2-neuron experts)
])
def test_router_routed_ffn_matches_the_two_ops(device, backend, dtype, t, d, f, e,
                                               low_rank, gated, bias, packed):
    x, router, ffn = _case(t, d, f, e, dtype, low_rank=low_rank, gated=gated, bias=bias,
                           packed=packed, seed=hash((t, d, f, e)) % 2**31, device=device)
    g = torch.Generator().manual_seed(1)
    act = ffn.pop("activation")
    w1 = router.pop("w_router")
    logits = router_logits_reference(x, w1, router["b_router"], router["w_router_out"],
                                     router["b_router_out"], router["hidden_activation"])
    for budget in _budgets(t, g):
        budget = budget.to(device) if isinstance(budget, torch.Tensor) else budget
        y, mask = ops.router_routed_ffn(x, w1, ffn["w_gate"], ffn["w_up"], ffn["w_down"], budget,
                                        **router, activation=act, b_up=ffn["b_up"],
                                        b_down=ffn["b_down"], backend=backend)
        want_mask = ops.router_route(x, w1, budget, **router, backend=backend)
        want = ops.routed_ffn(x, **ffn, mask=mask, activation=act, backend=backend)
        assert mask.dtype == torch.bool and mask.shape == (t, e)
        assert y.dtype == dtype and y.shape == (t, d)
        # the same kernels back to back: the same bits
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        # and the semantics: the reference routing (up to rounding at the budget), the fp64
        # routed FFN of that mask
        bt = torch.as_tensor(budget, dtype=torch.float32, device=device).expand(t)
        assert_mask_equal_up_to_rounding(mask, route_reference(logits, bt, 1, e), logits, bt)
        ref = routed_ffn_reference(x.double(), *(None if w is None else w.double() for w in (
            ffn["w_gate"], ffn["w_up"], ffn["w_down"])), mask, act,
            *(None if w is None else w.double() for w in (ffn["b_up"], ffn["b_down"])))
        assert_close_rel(y, ref, dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_bound_router_routed_ffn_equals_the_op(device, backend):
    x, router, ffn = _case(2, 24, 60, 6, torch.float32, low_rank=True, gated=True, bias=True,
                           packed=False, seed=3, device=device)
    act = ffn.pop("activation")
    w1 = router.pop("w_router")
    br = ops.bind_router_route(w1, **router, min_experts=2, backend=backend)
    bf = ops.bind_routed_ffn(**ffn, activation=act, backend=backend)
    both = ops.BoundRouterRoutedFFN(br, bf)
    for budget in (0.3, torch.tensor([0.9, 0.1], device=device)):
        y, mask = both(x, budget)
        y2, mask2 = ops.router_routed_ffn(x, w1, ffn["w_gate"], ffn["w_up"], ffn["w_down"],
                                          budget, **router, min_experts=2, activation=act,
                                          b_up=ffn["b_up"], b_down=ffn["b_down"], backend=backend)
        assert torch.equal(mask, mask2) and mask.sum(-1).min() >= 2
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x must be a \[T, d=24\]"):
        both(x.double(), 0.5)


def test_router_routed_ffn_errors_name_the_argument():
    x, router, ffn = _case(1, 24, 60, 6, torch.float32, low_rank=False, gated=True, bias=False,
                           packed=False, seed=4)
    w1 = router.pop("w_router")
    ffn.pop("activation")
    with pytest.raises(ValueError, match="must divide the FFN width F=60"):
        ops.router_routed_ffn(x, torch.randn(7, 24), ffn["w_gate"], ffn["w_up"], ffn["w_down"],
                              b_router=torch.randn(7), hidden_activation="none")
    with pytest.raises(ValueError, match="w_up has dtype torch.bfloat16 but x has torch.float32"):
        ops.router_routed_ffn(x, w1, None, ffn["w_up"].bfloat16(), ffn["w_down"], **router)
    with pytest.raises(ValueError, match=r"budget must lie in \[0, 1\], got 1.5"):
        ops.router_routed_ffn(x, w1, ffn["w_gate"], ffn["w_up"], ffn["w_down"], 1.5, **router)
    with pytest.raises(ValueError, match="w_router must have shape"):
        ops.router_routed_ffn(x, w1[:, :5], ffn["w_gate"], ffn["w_up"], ffn["w_down"], **router)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the compiled extension")
def test_cpu_router_routed_ffn_compiles_as_one_op():
    """Under torch.compile the C++ op traces through its fake kernel (one op in the graph)."""
    x, router, ffn = _case(1, 24, 60, 6, torch.float32, low_rank=True, gated=True, bias=False,
                           packed=True, seed=5)
    act = ffn.pop("activation")
    w1 = router.pop("w_router")

    def step(x, budget):
        return ops.router_routed_ffn(x, w1, **ffn, budget=budget, **router, activation=act,
                                     backend="cpu")

    budget = torch.tensor([0.6])
    y, mask = torch.compile(step, fullgraph=True)(x, budget)
    y2, mask2 = step(x, budget)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", [c for c in CASES if "triton" in str(c)])
def test_triton_router_routed_ffn_compiles(device, backend):
    """Under torch.compile (fullgraph) the Triton op traces as its two custom ops; same
    results as eager."""
    x, router, ffn = _case(1, 24, 60, 6, torch.float32, low_rank=True, gated=True, bias=False,
                           packed=True, seed=6, device=device)
    act = ffn.pop("activation")
    w1 = router.pop("w_router")

    def step(x, budget):
        return ops.router_routed_ffn(x, w1, **ffn, budget=budget, **router, activation=act,
                                     backend=backend)

    budget = torch.tensor([0.6], device=device)
    y, mask = torch.compile(step, fullgraph=True)(x, budget)
    y2, mask2 = step(x, budget)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
