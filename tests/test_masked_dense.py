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
