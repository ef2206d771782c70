"""ops.masked_act / ops.masked_dense_ffn against the torch reference (routed_ffn_reference).

The Triton masked-activation kernel runs under TRITON_INTERPRET=1 on the CPU (CI) and on
CUDA on a GPU; the side-stream overlap (and its CUDA-graph capture) only on a GPU.
"""

import pytest
import torch

from prunepath import ops
from prunepath.ops.masked_dense import masked_act_reference
from prunepath.ops.reference import ACTIVATIONS, routed_ffn_reference

from .helpers import assert_close_rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in ops.available_backends(DEV)


def _mask(t, e, density, gen):
    return (torch.rand(t, e, generator=gen) < density).to(DEV)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("t,e,n", [(1, 1, 7), (3, 5, 24), (17, 12, 5)])
def test_masked_act_kernel_matches_reference(dtype, gated, activation, t, e, n):
    from prunepath import triton_kernels

    gen = torch.Generator().manual_seed(hash((t, e, n, gated, activation)) % 2**31)
    f = e * n
    g = (torch.randn(t, f, generator=gen) * 2).to(DEV, dtype) if gated else None
    u = (torch.randn(t, f, generator=gen) * 2).to(DEV, dtype)
    for density in (0.0, 0.4, 1.0):
        mask = _mask(t, e, density, gen)
        out = torch.full((t, f), float("nan"), dtype=dtype, device=DEV)  # poisoned
        h = triton_kernels._masked_act.masked_act(g, u, mask, activation, out=out)
        ref = masked_act_reference(None if g is None else g.double(), u.double(), mask, activation)
        assert h is out and torch.isfinite(h).all()
        off = ~mask.repeat_interleave(n, dim=1)
        assert (h[off] == 0).all(), "inactive experts' neurons must be exactly zero"
        if mask.any():
            assert_close_rel(h.double(), ref, dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,bias,activation", [(True, False, "silu"), (False, True, "gelu")])
@pytest.mark.parametrize("t", [1, 4, 9])
def test_masked_dense_ffn_equals_routed_ffn(backend, dtype, gated, bias, activation, t):
    gen = torch.Generator().manual_seed(t * 7 + int(gated))
    d, e, n = 24, 6, 10
    f = e * n
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, wu, wd = r(t, d), r(f, d) / d**0.5, r(d, f) / f**0.5
    wg = r(f, d) / d**0.5 if gated else None
    bu, bd = (r(f) * 0.1, r(d) * 0.1) if bias else (None, None)
    mv = lambda w: None if w is None else w.to(DEV, dtype)  # noqa: E731
    x, wg, wu, wd, bu, bd = map(mv, (x, wg, wu, wd, bu, bd))
    for density in (0.0, 0.5, 1.0):
        mask = _mask(t, e, density, gen)
        ref = routed_ffn_reference(*(None if v is None else v.double() for v in (x, wg, wu, wd)),
                                   mask, activation, *(None if v is None else v.double() for v in (bu, bd)))
        calls = []

        def route():
            calls.append(1)
            return mask

        stream = torch.cuda.Stream() if DEV == "cuda" else None
        for m in (mask, route):
            y, used = ops.masked_dense_ffn(x, wg, wu, wd, m, activation=activation, b_up=bu,
                                           b_down=bd, stream=stream, backend=backend)
            if DEV == "cuda":
                torch.cuda.synchronize()
            assert torch.equal(used, mask)
            assert y.dtype == dtype and y.shape == (t, d)
            assert_close_rel(y.double(), ref, dtype)
        assert calls == [1], "a callable mask is called exactly once"


def test_masked_dense_bad_arguments():
    x, w, wd = torch.randn(2, 8), torch.randn(12, 8), torch.randn(8, 12)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ops.masked_dense_ffn(x, None, w, wd, m.float())
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ops.masked_dense_ffn(x, None, w, wd, lambda: "not a mask")
    with pytest.raises(ValueError, match="divisible"):
        ops.masked_dense_ffn(x, None, w, wd, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="w_down must have shape"):
        ops.masked_dense_ffn(x, None, w, w, m)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        ops.masked_dense_ffn(x[0], None, w, wd, m)
    with pytest.raises(ValueError, match="g must match u"):
        ops.masked_act(torch.randn(2, 6), torch.randn(2, 12), m)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.masked_act(None, torch.randn(2, 12), m, activation="tanh")
    with pytest.raises(ValueError, match="backend must be"):
        ops.masked_act(None, torch.randn(2, 12), m, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masked_dense_overlap_captures_in_a_cuda_graph():
    """The side-stream fork/join captures; replays see new inputs and a new budget."""
    gen = torch.Generator().manual_seed(3)
    t, d, e, n = 8, 64, 16, 32
    f = e * n
    dt = torch.bfloat16
    r = lambda *s: (torch.randn(*s, generator=gen)).to("cuda", dt)  # noqa: E731
    x, wg, wu, wd = r(t, d), r(f, d) / d**0.5, r(f, d) / d**0.5, r(d, f) / f**0.5
    wr = r(e, d)
    budget = torch.full((t,), 0.5, device="cuda")
    stream = torch.cuda.Stream()

    def step():
        return ops.masked_dense_ffn(x, wg, wu, wd, lambda: ops.router_route(x, wr, budget),
                                    stream=stream)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, mask = step()
    for b in (0.5, 0.2, 1.0):
        x.copy_(r(t, d))
        budget.fill_(b)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want_mask = ops.router_route(x, wr, budget)  # the same kernels, eager
        assert torch.equal(mask, want_mask)
        ref = routed_ffn_reference(x.double(), wg.double(), wu.double(), wd.double(), want_mask, "silu")
        assert_close_rel(y.double(), ref, dt)


# --- router_masked_dense_ffn: the router in the up GEMM, the routing in the activation kernel


def _router(kind, d_or_z, e, gen, dtype, *, rank=6, bias=True):
    """(w_router [E or R, d], b_router, w_router_out, b_router_out, hidden_activation)."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if kind == "linear":
        return (r(e, d_or_z) / d_or_z**0.5 * 3).to(DEV, dtype), r(e).to(DEV) if bias else None, None, None, "none"
    return ((r(rank, d_or_z) / d_or_z**0.5 * 2).to(DEV, dtype), r(rank).to(DEV) if bias else None,
            (r(e, rank) * 2).to(DEV), r(e).to(DEV) if bias else None, "gelu")


def _budgets(t, gen):
    return [0.0, 0.45, 1.0, torch.rand(t, generator=gen).to(DEV)]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("kind", ["linear", "low_rank"])
@pytest.mark.parametrize("t,e,n", [(1, 1, 7), (3, 5, 24), (17, 12, 5), (4, 64, 3), (2, 3, 300),
                                   (2, 200, 2)])
def test_routed_act_kernel_matches_reference(dtype, gated, kind, t, e, n):
    """The kernel's mask is the cumulative-mass rule on its logits (up to rounding at the
    budget), its h is act(g) * u on that mask, inactive neurons exactly 0; poisoned outputs."""
    from prunepath import triton_kernels
    from prunepath.ops.masked_dense import routed_act_logits
    from prunepath.ops.reference import route_reference

    from .helpers import assert_mask_equal_up_to_rounding

    if kind == "low_rank" and e > 128:  # (the op computes those logits first: linear here)
        kind = "linear"
    gen = torch.Generator().manual_seed(hash((t, e, n, gated, kind, str(dtype))) % 2**31)
    f = e * n
    g = (torch.randn(t, f, generator=gen) * 2).to(DEV, dtype) if gated else None
    u = (torch.randn(t, f, generator=gen) * 2).to(DEV, dtype)
    _, b1, w2, b2, hid = _router(kind, 8, e, gen, dtype, bias=e != 5)
    z = (torch.randn(t, e if kind == "linear" else 6, generator=gen) * 2).to(DEV, dtype)
    logits = routed_act_logits(z, b1, w2, b2, hid)
    for budget in _budgets(t, gen):
        bt = torch.as_tensor(budget, dtype=torch.float32, device=DEV).expand(t)
        for lo, hi in ((1, e), (min(2, e), max(1, e - 1))):
            out = torch.full((t, f), float("nan"), dtype=dtype, device=DEV)
            mask_out = torch.ones((t, e), dtype=torch.bool, device=DEV)  # poisoned: all on
            h, mask = triton_kernels._masked_act.routed_act(
                g, u, z, b1, w2, b2, hid, bt, lo, hi, "silu", out=out, mask_out=mask_out)
            assert h is out and mask is mask_out
            want = route_reference(logits, bt, lo, hi)
            assert_mask_equal_up_to_rounding(mask.cpu(), want.cpu(), logits.cpu(), bt.cpu())
            ref = masked_act_reference(None if g is None else g.double(), u.double(), mask, "silu")
            assert torch.isfinite(h).all()
            assert (h[~mask.repeat_interleave(n, dim=1)] == 0).all()
            if mask.any():
                assert_close_rel(h.double(), ref, dtype)


def _ffn_weights(d, f, gen, dtype, gated, bias):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    wu, wd = r(f, d) / d**0.5, r(d, f) / f**0.5
    wg = r(f, d) / d**0.5 if gated else None
    bu, bd = (r(f) * 0.1, r(d) * 0.1) if bias else (None, None)
    return [None if v is None else v.to(DEV, dtype) for v in (wg, wu, wd, bu, bd)]


@pytest.mark.parametrize("backend", ["auto", "torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,bias,kind", [(True, False, "linear"), (True, False, "low_rank"),
                                             (False, True, "linear")])
@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("t", [1, 4, 9])
def test_router_masked_dense_ffn_equals_route_then_routed_ffn(backend, dtype, gated, bias, kind,
                                                              stack, t):
    """(y, mask) against ops.router_route's rule on the same logits and routed_ffn_reference
    on that mask (fp64), with the weights stacked in one storage (one GEMM) or not."""
    import torch.nn.functional as F

    from prunepath.ops.masked_dense import routed_act_logits, stacked
    from prunepath.ops.reference import route_reference
    from prunepath.ops.router_route import router_logits_reference

    from .helpers import assert_mask_equal_up_to_rounding

    gen = torch.Generator().manual_seed(t * 11 + int(gated) + 2 * int(stack))
    d, e, n = 24, 6, 10
    f = e * n
    wg, wu, wd, bu, bd = _ffn_weights(d, f, gen, dtype, gated, bias)
    w1, b1, w2, b2, hid = _router(kind, d, e, gen, dtype)
    if stack:  # the rows of one storage, as prunepath.decode.stacked_ffn lays them
        rows = [w for w in (wg, wu, w1) if w is not None]
        joint = torch.cat(rows)
        views = list(joint.split([w.shape[0] for w in rows]))
        assert stacked(*views) is not None
        wg, wu, w1 = (None, *views) if wg is None else views
    x = torch.randn(t, d, generator=gen).to(DEV, dtype)
    # the router's projection comes out of the GEMM in x's dtype, then fp32 (documented)
    logits = routed_act_logits(F.linear(x, w1), b1, w2, b2, hid)
    assert_close_rel(logits.double(), router_logits_reference(x, w1, b1, w2, b2, hid).double(),
                     dtype)
    for budget in _budgets(t, gen):
        bt = torch.as_tensor(budget, dtype=torch.float32, device=DEV).expand(t)
        y, mask = ops.router_masked_dense_ffn(
            x, wg, wu, wd, w1, budget, b_router=b1, w_router_out=w2, b_router_out=b2,
            hidden_activation=hid, activation="gelu" if not gated else "silu", b_up=bu,
            b_down=bd, backend=backend)
        eps = 1e-4 if dtype == torch.float32 else 1e-2  # GEMMs may round differently
        assert_mask_equal_up_to_rounding(mask.cpu(), route_reference(logits, bt, 1, e).cpu(),
                                         logits.cpu(), bt.cpu(), mass_eps=eps)
        dd = lambda v: None if v is None else v.double()  # noqa: E731
        ref = routed_ffn_reference(dd(x), dd(wg), dd(wu), dd(wd), mask,
                                   "gelu" if not gated else "silu", dd(bu), dd(bd))
        assert y.dtype == dtype and y.shape == (t, d)
        assert_close_rel(y.double(), ref, dtype)


def test_stacked_views():
    from prunepath.ops.masked_dense import stacked

    joint = torch.randn(9, 4)
    a, b, c = joint[:2], joint[2:7], joint[7:]
    s = stacked(a, b, c)
    assert s is not None and s.data_ptr() == joint.data_ptr() and torch.equal(s, joint)
    assert stacked(a, c) is None and stacked(b, a) is None  # gaps, order
    assert stacked(a, torch.randn(3, 4)) is None and stacked(a, None) is None
    assert stacked(joint[:, :2]) is None  # not contiguous


def test_router_masked_dense_bad_arguments():
    x, w, wd = torch.randn(2, 8), torch.randn(12, 8), torch.randn(8, 12)
    with pytest.raises(ValueError, match="must divide the FFN width"):
        ops.router_masked_dense_ffn(x, None, w, wd, torch.randn(5, 8))
    with pytest.raises(ValueError, match="w_router must have shape"):
        ops.router_masked_dense_ffn(x, None, w, wd, torch.randn(4, 7))
    with pytest.raises(ValueError, match="w_router has dtype"):
        ops.router_masked_dense_ffn(x, None, w, wd, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="budget"):
        ops.router_masked_dense_ffn(x, None, w, wd, torch.randn(4, 8), 1.5)
    with pytest.raises(ValueError, match="w_down must have shape"):
        ops.router_masked_dense_ffn(x, None, w, w, torch.randn(4, 8))
