"""GPU backends ("triton", "cuda", and the "torch" reference on CUDA) against the float64
reference: fresh random inputs, poisoned memory, odd sizes, expert sizes that are not powers
of two, T = 1..64, budgets 0..1, fp32/bf16/fp16, gated and not; torch.compile and CUDA-graph
capture/replay; the measured backend="auto".

Run on a GPU machine: ``pytest -m gpu``. Skipped without CUDA. Backends named in
PRUNEPATH_REQUIRE_GPU_BACKENDS (default "triton,cuda") must be available, else the tests fail.
"""

import os

import pytest
import torch

from prunepath import ops
from prunepath.ops import autotune
from prunepath.ops.packed import routed_ffn_packed_reference
from prunepath.ops.reference import route_reference, routed_ffn_reference
from prunepath.ops.router_route import router_logits_reference

from .helpers import assert_close_rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REQUIRED = [b for b in os.environ.get("PRUNEPATH_REQUIRE_GPU_BACKENDS", "triton,cuda").split(",")
            if b]
GPU_BACKENDS = ["triton", "cuda", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gpu_backend(name):
    if name not in ops.available_backends("cuda"):
        if name in REQUIRED:
            pytest.fail(f"GPU backend {name!r} is required but unavailable")
        pytest.skip(f"backend {name!r} not available")
    return name


def poison_allocator(nbytes=64 << 20):
    """Fill freed allocator memory with NaN so an unwritten output element shows up."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def assert_mask_matches(out, logits, budget, lo, hi):
    """Exact match with the CPU reference, except where rounding (GPU vs CPU softmax) puts the
    budget within 1e-5 of a token's cumulative mass (checked, not assumed)."""
    ref = route_reference(logits.cpu(), budget.cpu(), lo, hi)
    bad = (out.cpu() != ref).any(-1)
    if bad.any():
        p = torch.softmax(logits.double().cpu(), -1)
        sp, _ = p.sort(-1, descending=True)
        gap = (sp.cumsum(-1) - sp - budget.double().cpu()[:, None]).abs().min(-1).values
        assert (gap[bad] < 1e-5).all(), f"{int(bad.sum())} tokens' masks differ"


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 2, 7, 16, 33, 64])
@pytest.mark.parametrize("e", [8, 64, 100, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route(backend, t, e, dtype):
    gpu_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(t * 1000 + e)
    logits = (torch.randn(t, e, device="cuda", generator=gen) * 3).to(dtype)
    for budget in (0.0, 0.1, 0.5, 0.9, 1.0, None):
        b = torch.rand(t, device="cuda", generator=gen) if budget is None else \
            torch.full((t,), budget, device="cuda")
        for lo, hi in ((1, e), (0, e), (2, min(e, 5))):
            poison_allocator()
            out = ops.route(logits, b, min_experts=lo, max_experts=hi, backend=backend)
            assert out.dtype == torch.bool and out.shape == (t, e)
            assert_mask_matches(out, logits, b, lo, hi)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_route_ties(backend):
    gpu_backend(backend)
    logits = torch.zeros(2, 8, device="cuda")
    out = ops.route(logits, torch.tensor([0.25, 0.5], device="cuda"), backend=backend)
    assert out.cpu().tolist() == [[True] * 2 + [False] * 6, [True] * 4 + [False] * 4]


# ------------------------------------------------------------------------ routed_ffn

SHAPES = [  # (d, F, E): expert sizes 86, 43, 3 and 9 (odd d: scalar code paths), and 16
    (256, 688, 8),  # with d >= 2048 (the compacted list's T >= 3 config: 256-wide slabs, PDL)
    (512, 2752, 64),
    (130, 384, 128),
    (72, 288, 32),
    (2048, 1536, 96),
]


def make_ffn(t, d, f, dtype, gated, bias, gen):
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    x = r(t, d)
    wg = r(f, d) / d**0.5 if gated else None
    wu = r(f, d) / d**0.5
    wd = r(d, f) / f**0.5
    bu = r(f) * 0.1 if bias else None
    bd = r(d) * 0.1 if bias else None
    cast = lambda w: None if w is None else w.to(dtype)  # noqa: E731
    return cast(x), cast(wg), cast(wu), cast(wd), cast(bu), cast(bd)


def reference(x, wg, wu, wd, mask, act, bu, bd):
    up = lambda w: None if w is None else w.double()  # noqa: E731
    return routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, act, up(bu), up(bd))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_routed_ffn(backend, shape, dtype, gated, packed):
    gpu_backend(backend)
    d, f, e = shape
    gen = torch.Generator(device="cuda").manual_seed(hash((shape, gated)) % 2**31)
    act = "silu" if gated else "gelu"
    for t in (1, 2, 3, 8, 16, 17, 64):
        x, wg, wu, wd, bu, bd = make_ffn(t, d, f, dtype, gated, not gated, gen)
        wdt = wd.t().contiguous()
        for budget in (0.0, 0.3, 0.7, 1.0, None):
            logits = torch.randn(t, e, device="cuda", generator=gen) * 2
            b = torch.rand(t, device="cuda", generator=gen) if budget is None else budget
            mask = ops.route(logits, b, backend="torch")
            poison_allocator()
            if packed:
                out = ops.routed_ffn_packed(x, wg, wu, wdt, mask, activation=act, b_up=bu,
                                            b_down=bd, backend=backend)
            else:
                out = ops.routed_ffn(x, wg, wu, wd, mask, activation=act, b_up=bu, b_down=bd,
                                     backend=backend)
            assert out.dtype == dtype and out.shape == (t, d)
            assert_close_rel(out, reference(x, wg, wu, wd, mask, act, bu, bd), dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_routed_ffn_activations(backend, activation):
    gpu_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, wg, wu, wd, bu, bd = make_ffn(5, 128, 256, torch.float32, True, True, gen)
    mask = ops.route(torch.randn(5, 16, device="cuda", generator=gen), 0.6, backend="torch")
    out = ops.routed_ffn(x, wg, wu, wd, mask, activation=activation, b_up=bu, b_down=bd,
                         backend=backend)
    assert_close_rel(out, reference(x, wg, wu, wd, mask, activation, bu, bd), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_expert_gives_bias_only(backend):
    gpu_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(4)
    x, _, wu, wd, bu, bd = make_ffn(4, 64, 128, torch.float32, False, True, gen)
    mask = torch.zeros(4, 8, dtype=torch.bool, device="cuda")
    out = ops.routed_ffn(x, None, wu, wd, mask, activation="relu", b_up=bu, b_down=bd,
                         backend=backend)
    torch.testing.assert_close(out, bd.expand(4, 64))


def test_packed_reference_matches_unpacked():
    gen = torch.Generator(device="cuda").manual_seed(8)
    x, wg, wu, wd, bu, bd = make_ffn(3, 64, 96, torch.float64, True, True, gen)
    mask = torch.rand(3, 12, device="cuda", generator=gen) < 0.5
    a = routed_ffn_packed_reference(x, wg, wu, wd.t().contiguous(), mask, "silu", bu, bd)
    torch.testing.assert_close(a, routed_ffn_reference(x, wg, wu, wd, mask, "silu", bu, bd))


# ----------------------------------------------------------------------- fused router


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("t,d,e", [(1, 4096, 64), (16, 4096, 128), (64, 2048, 100)])
def test_router_route(dtype, low_rank, t, d, e):
    gpu_backend("triton")
    gen = torch.Generator(device="cuda").manual_seed(t + e)
    x = torch.randn(t, d, device="cuda", generator=gen).to(dtype)
    r = 64 if low_rank else e
    w1 = (torch.randn(r, d, device="cuda", generator=gen) / d**0.5 * 3).to(dtype)
    b1 = torch.randn(r, device="cuda", generator=gen)
    w2 = torch.randn(e, r, device="cuda", generator=gen) / r**0.5 * 3 if low_rank else None
    b2 = torch.randn(e, device="cuda", generator=gen) if low_rank else None
    budget = torch.rand(t, device="cuda", generator=gen)
    kw = dict(b_router=b1, w_router_out=w2, b_router_out=b2, hidden_activation="gelu")
    out = ops.router_route(x, w1, budget, backend="triton", **kw)
    logits = router_logits_reference(x.double(), w1.double(), b1.double(),
                                     None if w2 is None else w2.double(),
                                     None if b2 is None else b2.double(), "gelu")
    # logits are accumulated in fp32 in a different order than fp64: allow boundary flips
    ref = route_reference(logits.cpu(), budget.cpu(), 1, e)
    bad = (out.cpu() != ref).any(-1)
    if bad.any():
        p = torch.softmax(logits.cpu(), -1)
        sp, _ = p.sort(-1, descending=True)
        gap = (sp.cumsum(-1) - sp - budget.double().cpu()[:, None]).abs().min(-1).values
        assert (gap[bad] < 1e-3).all()


# ------------------------------------------------------------ compile and CUDA graphs


def _decode_step(backend, wg, wu, wd, packed=None):
    def step(x, logits, budget):
        mask = ops.route(logits, budget, backend=backend)
        if packed is not None:
            return ops.routed_ffn_packed(x, wg, wu, packed, mask, backend=backend)
        return ops.routed_ffn(x, wg, wu, wd, mask, backend=backend)

    return step


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_graph_replay_matches_eager(backend, packed):
    gpu_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(9)
    x, wg, wu, wd, _, _ = make_ffn(4, 512, 1376, torch.bfloat16, True, False, gen)
    step = _decode_step(backend, wg, wu, wd, wd.t().contiguous() if packed else None)
    sx = x.clone()
    sl = torch.randn(4, 16, device="cuda", generator=gen)
    sb = torch.full((4,), 0.5, device="cuda")
    step(sx, sl, sb)  # warm up (compiles kernels) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(sx, sl, sb)
    for _ in range(3):  # new inputs copied into the static buffers, replay, compare
        nx = torch.randn(4, 512, device="cuda", generator=gen).to(torch.bfloat16)
        nl = torch.randn(4, 16, device="cuda", generator=gen)
        nb = torch.rand(4, device="cuda", generator=gen)
        sx.copy_(nx), sl.copy_(nl), sb.copy_(nb)
        graph.replay()
        torch.cuda.synchronize()
        eager = step(nx, nl, nb)
        assert torch.equal(out, eager)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_matches_eager(backend):
    gpu_backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(10)
    x, wg, wu, wd, _, _ = make_ffn(3, 256, 688, torch.bfloat16, True, False, gen)
    step = _decode_step(backend, wg, wu, wd)
    logits = torch.randn(3, 8, device="cuda", generator=gen)
    budget = torch.full((3,), 0.6, device="cuda")
    eager = step(x, logits, budget)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x, logits, budget)
    assert torch.equal(out.clone(), eager)


# ------------------------------------------------------------------- backend="auto"


def test_auto_measures_once_and_caches_on_disk(tmp_path, monkeypatch):
    if len([b for b in GPU_BACKENDS if b in ops.available_backends("cuda")]) < 2:
        pytest.skip("needs two GPU backends")
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    autotune.clear()
    calls = []
    real = autotune.measure
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(12)
    x, wg, wu, wd, _, _ = make_ffn(3, 256, 688, torch.bfloat16, True, False, gen)
    mask = torch.rand(3, 8, device="cuda", generator=gen) < 0.5
    out = ops.routed_ffn(x, wg, wu, wd, mask)
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", None, None), torch.bfloat16)
    assert len(calls) == 1
    x4 = torch.randn(4, 256, device="cuda", generator=gen).to(torch.bfloat16)
    ops.routed_ffn(x4, wg, wu, wd, mask[:1].expand(4, 8).contiguous())  # T=3, 4: one bucket
    assert len(calls) == 1
    assert (tmp_path / "autotune.json").exists()
    choice = autotune._CHOICES.copy()
    autotune.clear()  # memory cleared: the disk file answers, no new measurement
    ops.routed_ffn(x, wg, wu, wd, mask)
    assert len(calls) == 1 and autotune._CHOICES == choice
    autotune.clear()


def test_auto_never_measures_during_capture(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    autotune.clear()
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured in capture"))
    gen = torch.Generator(device="cuda").manual_seed(13)
    x, wg, wu, wd, _, _ = make_ffn(2, 128, 256, torch.float16, True, False, gen)
    mask = torch.rand(2, 8, device="cuda", generator=gen) < 0.5
    for name in ops.available_backends("cuda"):  # compile every kernel outside the capture
        ops.routed_ffn(x, wg, wu, wd, mask, backend=name)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.routed_ffn(x, wg, wu, wd, mask)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", None, None), torch.float16)
    autotune.clear()
