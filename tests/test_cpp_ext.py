"""The compiled extension prunepath._C on its own: schemas and fake kernels (opcheck),
torch.compile tracing, input checks of the raw torch.ops, and paths of the CPU kernels that
tests/test_ops.py does not reach (generic ISA, fp16/fp64, the decode/gather switch,
bit-exact routing at scale, reading only the active experts' weights)."""

import pytest
import torch

from prunepath import ops
from prunepath.ops.reference import route_reference, routed_ffn_reference
from prunepath.ops.router_route import router_logits_reference

from .helpers import assert_close_rel, assert_mask_equal_up_to_rounding
from .test_ops import REQUIRED

if "cpu" not in ops.available_backends("cpu"):
    if "cpu" in REQUIRED:
        pytest.fail("the compiled extension prunepath._C is required (PRUNEPATH_REQUIRE_BACKENDS)",
                    pytrace=False)
    pytest.skip("prunepath._C is not built", allow_module_level=True)

route_op = torch.ops.prunepath.route.default
ffn_op = torch.ops.prunepath.routed_ffn.default
packed_op = torch.ops.prunepath.routed_ffn_packed.default


def run_ffn(packed, x, wg, wu, wd, mask, act, bu, bd):
    """routed_ffn with nn.Linear's W_down [d, F], or routed_ffn_packed with W_down^T [F, d]."""
    if packed:
        return packed_op(x, wg, wu, wd.t().contiguous(), mask, act, bu, bd)
    return ffn_op(x, wg, wu, wd, mask, act, bu, bd)


def ffn_args(t, d, f, e, dtype, gated=True, bias=False, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen)
    wg = torch.randn(f, d, generator=gen) / d**0.5 if gated else None
    wu = torch.randn(f, d, generator=gen) / d**0.5
    wd = torch.randn(d, f, generator=gen) / f**0.5
    bu = torch.randn(f, generator=gen) * 0.1 if bias else None
    bd = torch.randn(d, generator=gen) * 0.1 if bias else None
    mask = torch.rand(t, e, generator=gen) < density
    cast = lambda w: None if w is None else w.to(dtype)  # noqa: E731
    return cast(x), cast(wg), cast(wu), cast(wd), mask, cast(bu), cast(bd)


def reference(x, wg, wu, wd, mask, act, bu, bd):
    up = lambda w: None if w is None else w.double()  # noqa: E731
    return routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, act, up(bu), up(bd))


# ------------------------------------------------------------------ schemas and fake kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_route(dtype):
    logits = torch.randn(5, 8).to(dtype)
    torch.library.opcheck(route_op, (logits, torch.rand(5), 1, 8))
    torch.library.opcheck(route_op, (logits, torch.ones(5), 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("t", [1, 3, 33])
def test_opcheck_routed_ffn(dtype, gated, act, t):
    x, wg, wu, wd, mask, bu, bd = ffn_args(t, 12, 16, 4, dtype, gated, bias=not gated)
    torch.library.opcheck(ffn_op, (x, wg, wu, wd, mask, act, bu, bd))
    torch.library.opcheck(packed_op, (x, wg, wu, wd.t().contiguous(), mask, act, bu, bd))


def test_torch_compile_fullgraph():
    x, wg, wu, wd, _, _, _ = ffn_args(3, 16, 32, 8, torch.float32)
    logits = torch.randn(3, 8)

    def layer(x, logits, wg, wu, wd):
        mask = ops.route(logits, 0.6, backend="cpu")
        return ops.routed_ffn(x, wg, wu, wd, mask, backend="cpu")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, logits, wg, wu, wd)
    torch.testing.assert_close(out, layer(x, logits, wg, wu, wd))
    mask = route_reference(logits, torch.full((3,), 0.6), 1, 8)
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", None, None), torch.float32)


# ---------------------------------------------------------------- input checks of raw ops


def test_raw_route_rejects_bad_inputs():
    logits, budget = torch.randn(4, 6), torch.rand(4)
    with pytest.raises(RuntimeError, match="contiguous"):
        route_op(torch.randn(6, 4).t(), budget, 1, 6)
    with pytest.raises(RuntimeError, match="budget must be float32"):
        route_op(logits, budget.double(), 1, 6)
    with pytest.raises(RuntimeError, match="budget must be a 1-D"):
        route_op(logits, torch.rand(3), 1, 6)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        route_op(logits[None], budget, 1, 6)
    with pytest.raises(RuntimeError, match="floating-point"):
        route_op(logits.long(), budget, 1, 6)
    with pytest.raises(RuntimeError, match="min_experts"):
        route_op(logits, budget, 3, 2)
    with pytest.raises(RuntimeError, match="min_experts"):
        route_op(logits, budget, 1, 7)


def test_raw_routed_ffn_rejects_bad_inputs():
    x, wg, wu, wd, mask, _, _ = ffn_args(3, 8, 12, 4, torch.float32)
    ok = (x, wg, wu, wd, mask, "silu", None, None)
    ffn_op(*ok)  # the good call works

    def call(**change):
        names = ("x", "w_gate", "w_up", "w_down", "mask", "activation", "b_up", "b_down")
        args = dict(zip(names, ok))
        args.update(change)
        return ffn_op(*args.values())

    cases = [
        (dict(x=torch.randn(8, 3).t()), "x must be contiguous"),
        (dict(w_up=torch.randn(8, 12).t()), "w_up must be contiguous"),
        (dict(w_gate=torch.randn(8, 12).t()), "w_gate must be contiguous"),
        (dict(w_down=torch.randn(12, 8).t()), "w_down must be contiguous"),
        (dict(mask=torch.ones(4, 3, dtype=torch.bool).t()), "mask must be contiguous"),
        (dict(w_up=wu.double()), "w_up must have dtype"),
        (dict(w_down=wd.bfloat16()), "w_down must have dtype"),
        (dict(x=x.bfloat16()), "must have dtype"),
        (dict(mask=mask.int()), "mask must have dtype"),
        (dict(b_up=torch.randn(12, dtype=torch.float64)), "b_up must have dtype"),
        (dict(b_down=torch.randn(7)), "b_down must have shape"),
        (dict(w_down=torch.randn(12, 8)), "w_down must have shape"),
        (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "divisible"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask must be 2-D"),
        (dict(x=x.long()), "x must be float32"),
        (dict(activation="swish"), "activation must be one of"),
    ]
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**change)


def test_raw_routed_ffn_packed_rejects_bad_w_down_t():
    x, wg, wu, wd, mask, _, _ = ffn_args(3, 8, 12, 4, torch.float32)
    packed_op(x, wg, wu, wd.t().contiguous(), mask, "silu", None, None)  # the good call works
    for bad, message in [(wd, "w_down_t must have shape"),  # nn.Linear's [d, F], not [F, d]
                         (torch.randn(8, 12).t(), "w_down_t must be contiguous"),
                         (wd.t().contiguous().bfloat16(), "w_down_t must have dtype")]:
        with pytest.raises(RuntimeError, match=message):
            packed_op(x, wg, wu, bad, mask, "silu", None, None)


# ------------------------------------------------------------------------- kernel paths


@pytest.mark.parametrize("isa", ["default", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 2, 5, 9])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_decode_kernels_match_reference(monkeypatch, isa, dtype, t, gated, packed):
    """Both ISA variants, every weight dtype, token tiles of 1..4 and row tails (d, B odd),
    both W_down layouts."""
    if isa == "generic":
        monkeypatch.setenv("PRUNEPATH_CPU_ISA", "generic")
    act = "silu" if gated else "gelu_tanh"
    for d, f, e in [(45, 35, 7), (64, 128, 8), (19, 96, 32), (13, 54, 6)]:
        x, wg, wu, wd, mask, bu, bd = ffn_args(t, d, f, e, dtype, gated, bias=True, seed=d + t)
        out = run_ffn(packed, x, wg, wu, wd, mask, act, bu, bd)
        assert out.dtype == dtype and out.shape == (t, d)
        assert_close_rel(out, reference(x, wg, wu, wd, mask, act, bu, bd),
                         torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("t", [9, 10, 31, 32, 70])  # gather from 10 (fp32) / 32 tokens
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_both_sides_of_the_gather_switch(t, dtype, packed):
    x, wg, wu, wd, mask, bu, bd = ffn_args(t, 33, 48, 12, dtype, True, bias=True, seed=t)
    mask[:, 5:8] = True  # a run of experts chosen by every token (merged matmul)
    mask[:, 9] = False
    out = run_ffn(packed, x, wg, wu, wd, mask, "relu", bu, bd)
    tol = torch.float32 if dtype in (torch.float32, torch.float64) else dtype
    assert out.dtype == dtype
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "relu", bu, bd), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_decode_and_gather_paths_agree(monkeypatch, dtype, packed):
    """The same call through both paths (PRUNEPATH_CPU_GATHER_MIN_TOKENS forces one)."""
    x, wg, wu, wd, mask, bu, bd = ffn_args(12, 40, 64, 8, dtype, True, bias=True, seed=3)
    outs = []
    for threshold in ("1000", "1"):
        monkeypatch.setenv("PRUNEPATH_CPU_GATHER_MIN_TOKENS", threshold)
        outs.append(run_ffn(packed, x, wg, wu, wd, mask, "gelu", bu, bd).float())
    ref = reference(x, wg, wu, wd, mask, "gelu", bu, bd)
    assert_close_rel(outs[0], ref, dtype)
    assert_close_rel(outs[1], ref, dtype)
    # both accumulate in fp32: they differ by at most the final rounding to dtype
    assert_close_rel(outs[0], outs[1].double(), dtype)


@pytest.mark.parametrize("t", [1, 4, 40])
@pytest.mark.parametrize("packed", [False, True])
def test_reads_only_active_experts(t, packed):
    """NaN in the weights of experts that no token chose must not reach the output."""
    e, f, d = 8, 64, 24
    x, wg, wu, wd, mask, bu, bd = ffn_args(t, d, f, e, torch.float32, True, bias=True, seed=t)
    mask[:, [1, 2, 6]] = False
    b = f // e
    poisoned = [w.clone() for w in (wg, wu, wd, bu)]
    for ex in (1, 2, 6):
        for w in poisoned[:2]:
            w[ex * b:(ex + 1) * b] = float("nan")
        poisoned[2][:, ex * b:(ex + 1) * b] = float("nan")
        poisoned[3][ex * b:(ex + 1) * b] = float("nan")
    out = run_ffn(packed, x, poisoned[0], poisoned[1], poisoned[2], mask, "silu", poisoned[3], bd)
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", bu, bd), torch.float32)


@pytest.mark.parametrize("isa", ["default", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_one_token_expert_pairs_and_row_quarters(monkeypatch, isa, dtype, packed):
    """One token at SmolLM2's FFN shape (E=96, 16-neuron experts), masks that give the
    kernels odd and even expert counts per thread (two experts' gate/up rows at a time, the
    odd one alone), runs and isolated experts (the packed down projection's quarters of the
    chunk's rows cross expert boundaries at different rows), 1 and 2 threads."""
    if isa == "generic":
        monkeypatch.setenv("PRUNEPATH_CPU_ISA", "generic")
    d, f, e = 576, 1536, 96
    x, wg, wu, wd, _, bu, bd = ffn_args(1, d, f, e, dtype, bias=True, seed=11)
    gen = torch.Generator().manual_seed(12)
    picks = [[5], [0, 40, 95], list(range(0, e, 2)), list(range(47)), list(range(1, 96, 3)),
             torch.randperm(e, generator=gen)[:61].tolist()]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for chosen in picks:
                mask = torch.zeros(1, e, dtype=torch.bool)
                mask[0, chosen] = True
                out = run_ffn(packed, x, wg, wu, wd, mask, "silu", bu, bd)
                assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", bu, bd), dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("packed", [False, True])
def test_thread_count_does_not_change_result(packed):
    x, wg, wu, wd, mask, _, _ = ffn_args(3, 64, 256, 16, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ffn(packed, x, wg, wu, wd, mask, "silu", None, None)
    finally:
        torch.set_num_threads(threads)
    many = run_ffn(packed, x, wg, wu, wd, mask, "silu", None, None)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_empty_inputs():
    x, wg, wu, wd, _, _, bd = ffn_args(0, 8, 12, 4, torch.float32, bias=True)
    empty_mask = torch.zeros(0, 4, dtype=torch.bool)
    assert ffn_op(x, wg, wu, wd, empty_mask, "silu", None, bd).shape == (0, 8)
    assert route_op(torch.randn(0, 4), torch.rand(0), 1, 4).shape == (0, 4)


# ------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("e", [2, 7, 64, 255, 256, 1536])  # from 256: the quickselect path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_route_bit_exact_at_scale(e, dtype):
    """Thousands of tokens, including exact ties and near-ties (coarsely quantized logits),
    budgets spread over [0, 1] and boundary-heavy budgets: the mask equals the reference."""
    gen = torch.Generator().manual_seed(e)
    t = 3000
    logits = torch.randn(t, e, generator=gen) * 4
    logits[: t // 3] = (logits[: t // 3] * 2).round() / 2  # many ties
    logits = logits.to(dtype)
    budget = torch.rand(t, generator=gen)
    edges = torch.tensor([0.0, 1.0, 0.5, 0.25, 1 - 1e-7, 1e-7, 0.9])
    budget[::7] = edges[torch.arange(0, t, 7) % 7]
    for lo, hi in [(1, e), (0, e), (min(2, e), max(min(2, e), e // 2))]:
        out = route_op(logits, budget, lo, hi)
        assert torch.equal(out, route_reference(logits, budget, lo, hi))


@pytest.mark.parametrize("e", [7, 64, 256, 1000, 4099])
def test_route_bit_exact_at_budget_boundaries(e):
    """Budgets set to the reference's own mass-before values, and one ulp either side: any
    difference in how the cumulative mass is rounded flips experts here (with fp32
    accumulation, or exact exclusive sums, hundreds of these rows differ)."""
    gen = torch.Generator().manual_seed(100 + e)
    t = 3000
    logits = torch.randn(t, e, generator=gen) * 4
    logits[: t // 3] = (logits[: t // 3] * 2).round() / 2
    sorted_p = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True).values
    mass_before = torch.cumsum(sorted_p, -1) - sorted_p
    budget = mass_before.gather(1, torch.randint(0, e, (t, 1), generator=gen))[:, 0]
    step = torch.randint(-1, 2, (t,), generator=gen)
    budget = torch.where(step > 0, torch.nextafter(budget, torch.tensor(2.0)), budget)
    budget = torch.where(step < 0, torch.nextafter(budget, torch.tensor(-1.0)), budget)
    budget = budget.clamp(0, 1).contiguous()
    assert torch.equal(route_op(logits, budget, 1, e), route_reference(logits, budget, 1, e))


def test_route_budget_at_exact_cumulative_mass():
    """A budget equal to the mass of the top experts stops there (mass_before < budget)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    for b, expected in [(0.5, 1), (0.75, 2), (0.5000001, 2), (0.875, 3), (1.0, 4)]:
        out = route_op(logits, torch.tensor([b]), 1, 4)
        assert int(out.sum()) == expected, b
        assert torch.equal(out, route_reference(logits, torch.tensor([b]), 1, 4))


def test_public_api_accepts_non_contiguous_weights():
    """The raw op rejects them (above); ops.routed_ffn(backend="cpu") copies them instead."""
    x, wg, wu, wd, mask, bu, bd = ffn_args(3, 16, 24, 4, torch.float32, bias=True)
    out = ops.routed_ffn(x, wg, wu.T.contiguous().T, wd.T.contiguous().T, mask, b_up=bu,
                         b_down=bd, backend="cpu")
    assert_close_rel(out, reference(x, wg, wu, wd, mask, "silu", bu, bd), torch.float32)


# ------------------------------------------------------------- fused router: router_route

router_op = torch.ops.prunepath.router_route.default

ROUTERS = {  # r=None: linear router ([E, d]); else low rank R with that activation
    "linear": dict(r=None, act="none"),
    "linear_bias": dict(r=None, act="gelu", b1=True),  # act is ignored by a linear router
    "lowrank_gelu": dict(r=24, act="gelu", b1=True, b2=True),
    "lowrank_gelu_tanh": dict(r=9, act="gelu_tanh", b2=True),
    "lowrank_relu": dict(r=16, act="relu", b1=True),
    "lowrank_silu": dict(r=5, act="silu"),
    "lowrank_none": dict(r=16, act="none"),
}


def router_args(router, t, d, e, dtype, seed):
    cfg = ROUTERS[router]
    gen = torch.Generator().manual_seed(seed)
    r = cfg["r"] or e
    x = torch.randn(t, d, generator=gen).to(dtype)
    w1 = (torch.randn(r, d, generator=gen) / d**0.5 * 3).to(dtype)
    b1 = torch.randn(r, generator=gen) if cfg.get("b1") else None
    w2 = torch.randn(e, r, generator=gen) / r**0.5 * 3 if cfg["r"] else None
    b2 = torch.randn(e, generator=gen) if cfg.get("b2") else None
    budget = torch.rand(t, generator=gen)
    return x, w1, dict(b_router=b1, w_router_out=w2, b_router_out=b2, hidden_activation=cfg["act"]), budget


@pytest.mark.parametrize("isa", ["native", "generic"])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,d,e", [(1, 83, 16), (4, 64, 70), (300, 37, 48)])
def test_router_route_matches_reference(monkeypatch, isa, router, dtype, t, d, e):
    if isa == "generic":
        monkeypatch.setenv("PRUNEPATH_CPU_ISA", "generic")
    x, w1, kw, budget = router_args(router, t, d, e, dtype, seed=hash((router, t, e)) % 2**31)
    budget[:3] = torch.tensor([0.0, 1.0, 0.999])[: min(3, t)]
    poison = torch.ones(t, e, dtype=torch.bool)  # what an unwritten output would look like
    out = ops.router_route(x, w1, budget, backend="cpu", **kw)
    assert out.shape == (t, e) and out.dtype == torch.bool and not torch.equal(out, poison)
    logits = router_logits_reference(x, w1, **kw)
    ref = route_reference(logits, budget, 1, e)
    assert_mask_equal_up_to_rounding(out, ref, logits, budget)
    assert (out.sum(-1) >= 1).all()
    if t >= 2:
        assert out[1].all()  # budget 1: every expert


@pytest.mark.parametrize("lo,hi", [(0, None), (2, 5), (3, 3)])
def test_router_route_expert_bounds(lo, hi):
    x, w1, kw, budget = router_args("lowrank_gelu", 40, 32, 12, torch.float32, seed=7)
    out = ops.router_route(x, w1, budget, min_experts=lo, max_experts=hi, backend="cpu", **kw)
    logits = router_logits_reference(x, w1, **kw)
    ref = route_reference(logits, budget, lo, 12 if hi is None else hi)
    assert_mask_equal_up_to_rounding(out, ref, logits, budget)
    counts = out.sum(-1)
    assert (counts >= lo).all() and (counts <= (12 if hi is None else hi)).all()


def test_router_route_is_the_auto_choice_on_cpu_and_fp64_falls_back():
    from prunepath.ops import cpp_backend

    x, w1, kw, budget = router_args("lowrank_gelu", 6, 32, 8, torch.float32, seed=8)
    calls = []
    orig = cpp_backend.router_route
    cpp_backend.router_route = lambda *a: calls.append(1) or orig(*a)
    try:
        ops.router_route(x, w1, budget, **kw)  # auto -> cpu on a CPU tensor
        assert calls == [1]
        x64, w64 = x.double(), w1.double()
        out = ops.router_route(x64, w64, budget, backend="cpu", **kw)  # fp64: torch logits + cpu route
        assert calls == [1]
    finally:
        cpp_backend.router_route = orig
    assert torch.equal(out, route_reference(router_logits_reference(x64, w64, **kw), budget, 1, 8))


@pytest.mark.parametrize("low_rank", [False, True])
def test_opcheck_router_route(low_rank):
    x, w1, kw, budget = router_args("lowrank_gelu" if low_rank else "linear_bias", 5, 16, 8,
                                    torch.float32, seed=9)
    torch.library.opcheck(router_op, (x, w1, kw["b_router"], kw["w_router_out"],
                                      kw["b_router_out"], kw["hidden_activation"], budget, 1, 8))


def test_router_route_traces_in_torch_compile():
    x, w1, kw, budget = router_args("lowrank_gelu", 3, 16, 8, torch.float32, seed=10)

    def fn(x, budget):
        return ops.router_route(x, w1, budget, backend="cpu", **kw)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, budget)
    assert torch.equal(out, fn(x, budget))


def test_raw_router_route_rejects_bad_inputs():
    x, w1, kw, budget = router_args("lowrank_gelu", 4, 16, 8, torch.float32, seed=11)
    b1, w2, b2 = kw["b_router"], kw["w_router_out"], kw["b_router_out"]
    router_op(x, w1, b1, w2, b2, "gelu", budget, 1, 8)  # the good call works
    with pytest.raises(RuntimeError, match="w_router must have dtype"):
        router_op(x, w1.bfloat16(), b1, w2, b2, "gelu", budget, 1, 8)
    with pytest.raises(RuntimeError, match="w_router must have shape"):
        router_op(x, w1[:, :15].contiguous(), b1, w2, b2, "gelu", budget, 1, 8)
    with pytest.raises(RuntimeError, match="w_router_out must have shape"):
        router_op(x, w1, b1, w2[:, :5].contiguous(), b2, "gelu", budget, 1, 8)
    with pytest.raises(RuntimeError, match="b_router_out must have shape"):
        router_op(x, w1, b1, w2, b2[:3], "gelu", budget, 1, 8)
    with pytest.raises(RuntimeError, match="b_router_out needs w_router_out"):
        router_op(x, w1, b1, None, b2, "gelu", budget, 1, 8)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        router_op(x, w1, b1, w2, b2, "tanh", budget, 1, 8)
    with pytest.raises(RuntimeError, match="budget must be"):
        router_op(x, w1, b1, w2, b2, "gelu", budget.double(), 1, 8)
    with pytest.raises(RuntimeError, match="min_experts"):
        router_op(x, w1, b1, w2, b2, "gelu", budget, 3, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        router_op(torch.randn(16, 4).t(), w1, b1, w2, b2, "gelu", budget, 1, 8)
    empty = router_op(x[:0], w1, b1, w2, b2, "gelu", budget[:0], 1, 8)
    assert empty.shape == (0, 8)


# ------------------------------------------------------------- decode-step linear: linear

linear_op = torch.ops.prunepath.linear.default


@pytest.mark.parametrize("isa", ["native", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,d,n", [(1, 83, 37), (3, 64, 1000), (8, 20, 9), (9, 33, 17),
                                   (2, 700, 1000)])  # 2.8 MB: 2 chunks of rows on 2 threads
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["rows", "transposed"])  # transposed: a packed W_down's view
def test_linear_matches_reference(monkeypatch, isa, dtype, t, d, n, bias, layout):
    if isa == "generic":
        monkeypatch.setenv("PRUNEPATH_CPU_ISA", "generic")
    gen = torch.Generator().manual_seed(hash((t, d, n, bias, layout == "transposed")) % 2**31)
    x = torch.randn(t, d, generator=gen).to(dtype)
    w = (torch.randn(n, d, generator=gen) / d**0.5).to(dtype)
    if layout == "transposed":
        w = w.t().contiguous().t()
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the transposed path's per-thread partial sums
    try:
        out = ops.linear(x, w, b)  # t = 9: more than MAX_TOKENS, F.linear
        direct = linear_op(x, w, b) if t <= 8 else None
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (t, n) and out.dtype == dtype
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert_close_rel(out, ref, dtype)
    if direct is not None:
        assert torch.isfinite(direct).all()
        assert_close_rel(direct, ref, dtype)


def test_linear_dispatch():
    x, w = torch.randn(2, 16), torch.randn(5, 16)
    calls = []
    orig = torch.ops.prunepath.linear
    try:
        torch.ops.prunepath.linear = lambda *a: calls.append(1) or orig(*a)
        ops.linear(x, w)
        assert calls == [1]  # the C++ kernel for a decode-sized input
        ops.linear(x, w, backend="torch")
        ops.linear(torch.randn(9, 16), w)  # more rows: F.linear
        ops.linear(x.double(), w.double())  # fp64: F.linear
        wg = w.clone().requires_grad_()
        y = ops.linear(x, wg)  # autograd: F.linear, differentiable
        y.sum().backward()
        assert calls == [1] and wg.grad is not None
    finally:
        torch.ops.prunepath.linear = orig
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.linear(x, torch.randn(5, 15))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="weight is torch.bfloat16"):
        ops.linear(x, w.bfloat16())
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.linear(x, w, backend="triton")
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        linear_op(x, w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        linear_op(x, w, torch.randn(4))
    assert linear_op(x[:0], w, None).shape == (0, 5)
    torch.library.opcheck(linear_op, (x, w, torch.randn(5)))
    torch.library.opcheck(linear_op, (x.bfloat16(), w.bfloat16(), None))
    # a packed W_down: the [N, d] view of a contiguous W^T (compiled CPU steps do not assert
    # output sizes and strides at run time; the fake kernel must say what the real one makes)
    torch.library.opcheck(linear_op, (x, w.t().contiguous().t(), None))


def test_fast_linear_enable_disable():
    from prunepath.decode import fast_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 7, bias=False))
    keys = list(model.state_dict())
    x = torch.randn(3, 1, 24)
    with torch.no_grad():
        ref = model(x)
    assert fast_linear.enable(model) == 2 and fast_linear.enabled(model) == 2
    assert fast_linear.enable(model) == 0  # already on
    assert list(model.state_dict()) == keys  # parameters and keys untouched
    calls = []
    orig = torch.ops.prunepath.linear
    try:
        torch.ops.prunepath.linear = lambda *a: calls.append(1) or orig(*a)
        with torch.no_grad():
            out = model(x)  # 3 rows: the C++ kernel
            assert len(calls) == 2
            model(torch.randn(2, 5, 24))  # 10 rows: F.linear
            assert len(calls) == 2
        model(x).sum().backward()  # autograd: F.linear, gradients flow
        assert len(calls) == 2 and model[0].weight.grad is not None
    finally:
        torch.ops.prunepath.linear = orig
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    assert fast_linear.disable(model) == 2 and fast_linear.enabled(model) == 0
    assert "forward" not in vars(model[0])
