"""Triton-specific tests: every kernel code path (forced block configs), the packed layout,
the fused router, and the custom-op registration (fake kernels, torch.compile).

On the CPU these run under TRITON_INTERPRET=1 (tests/conftest.py), so sizes are tiny.
On a GPU the same tests run on CUDA tensors.
"""

import dataclasses

import pytest
import torch

from prunepath import ops
from prunepath.ops.packed import routed_ffn_packed_reference
from prunepath.ops.reference import route_reference, routed_ffn_reference
from prunepath.ops.router_route import router_logits_reference

from .helpers import assert_close_rel, assert_mask_equal_up_to_rounding

triton_kernels = pytest.importorskip("prunepath.triton_kernels")
from prunepath.triton_kernels import launch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and "triton" not in ops.available_backends("cpu"):
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _ffn(t, d, f, dtype, gated, bias, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = r(t, d)
    wg = r(f, d) / d**0.5 if gated else None
    wu = r(f, d) / d**0.5
    wd = r(d, f) / f**0.5
    bu = r(f) * 0.1 if bias else None
    bd = r(d) * 0.1 if bias else None
    mv = lambda w: None if w is None else w.to(DEV, dtype)  # noqa: E731
    return mv(x), mv(wg), mv(wu), mv(wd), mv(bu), mv(bd)


def _ref(x, wg, wu, wd, mask, act, bu, bd):
    up = lambda w: None if w is None else w.double()  # noqa: E731
    return routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, act, up(bu), up(bd))


_CHUNKED = {
    # (block_t, up_n, up_k, ks, down_n, down_d, s): each phase's single- and multi-split paths
    "plain": launch.FFNConfig(16, 16, 32, 1, 16, 32, 1),
    "split_d": launch.FFNConfig(16, 16, 16, 4, 16, 32, 1),
    "split_f": launch.FFNConfig(16, 16, 32, 1, 16, 16, 4),
    "split_both": launch.FFNConfig(16, 32, 16, 2, 32, 16, 2),
    # the separate reduce launch instead of the down kernel's folded last-program sum
    "split_f_reduce": launch.FFNConfig(16, 16, 32, 1, 16, 16, 4, fold_reduce=False),
}
# every path twice: on aligned chunks and on the compacted live-neuron list
CONFIGS = {**{k: dataclasses.replace(c, compact=False) for k, c in _CHUNKED.items()},
           **{k + "+compact": dataclasses.replace(c, compact=True) for k, c in _CHUNKED.items()}}


FFN_KINDS = [(True, False, "silu"), (False, True, "gelu_tanh"), (True, True, "relu"),
             (False, False, "gelu")]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("d,f,e", [(72, 60, 12), (40, 120, 3), (48, 136, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_code_paths(config, d, f, e, dtype):
    """Each block config (single/multi split of each phase, chunked and compacted) on three
    expert sizes: 5 neurons per expert (many experts per chunk), 40 (at most two per chunk)
    and 8 (a power of two: the compacted path's vectorized nn.Linear W_down loads); T = 1
    and 20 (two token blocks); both W_down layouts; gated and not, with and without biases."""
    i = list(CONFIGS).index(config) + (f == 120) * 2 + (f == 136) + (dtype == torch.bfloat16)
    gated, bias, act = FFN_KINDS[i % len(FFN_KINDS)]
    gen = torch.Generator().manual_seed(hash((config, f, str(dtype))) % 2**31)
    for t in (1, 20):
        x, wg, wu, wd, bu, bd = _ffn(t, d, f, dtype, gated, bias, gen)
        mask = (torch.rand(t, e, generator=gen) < 0.4).to(DEV)
        ref = _ref(x, wg, wu, wd, mask, act, bu, bd)
        for w_down_t in (wd.t(), wd.t().contiguous()):  # nn.Linear layout and the packed one
            out = torch.full((t, d), float("nan"), dtype=dtype, device=DEV)
            launch.routed_ffn(x, wg, wu, w_down_t, mask, act, bu, bd, config=CONFIGS[config],
                              out=out, poison=True)
            assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("f,e", [(60, 12), (120, 3), (688, 4), (130, 10), (64, 64)])
@pytest.mark.parametrize("t", [1, 5, 70])
def test_live_chunk_lists_match_reference(f, e, t):
    """The kernels' in-register live-chunk list (two chunk sizes) against plain torch:
    random, empty and full masks; expert sizes 5, 40, 172, 13, 1 (not aligned to the
    chunks); 70 tokens take several union steps when E is large."""
    gen = torch.Generator().manual_seed(f * 100 + e + t)
    masks = [torch.rand(t, e, generator=gen) < p for p in (0.05, 0.3, 0.7)]
    masks += [torch.zeros(t, e, dtype=torch.bool), torch.ones(t, e, dtype=torch.bool)]
    for mask in masks:
        for bn in (16, 32):
            got = launch.live_chunks(mask.to(DEV), 96, f, bn, block_k=32, up_items=8, ks_max=4)
            assert got["chunks"] == launch.live_chunks_reference(mask, f, bn)
        # d = 96, BLOCK_K = 32: 3 k-blocks; splits: enough items (>= 8) of the live neurons
        # in 32-chunks, at most 3
        live_neurons = int(mask.any(0).sum()) * (f // e)
        ks = min(3, -(-8 // max(-(-live_neurons // 32), 1)))
        assert got["ks"] == -(-3 // -(-3 // ks)) and got["k_blocks_per_split"] == -(-3 // ks)


@pytest.mark.parametrize("compact", [False, True])
def test_ffn_up_programs_loop_and_empty_mask(compact):
    """Fewer up programs than work items (each loops over several), and an all-false mask
    (nothing live: the output is b_down)."""
    gen = torch.Generator().manual_seed(21)
    x, wg, wu, wd, bu, bd = _ffn(3, 40, 120, torch.float32, True, True, gen)
    cfg = launch.FFNConfig(16, 16, 16, 4, 16, 16, 2, up_programs=3, compact=compact)
    for mask in (torch.rand(3, 3, generator=gen) < 0.6, torch.ones(3, 3, dtype=torch.bool),
                 torch.zeros(3, 3, dtype=torch.bool)):
        mask = mask.to(DEV)
        out = torch.full((3, 40), float("nan"), device=DEV)
        launch.routed_ffn(x, wg, wu, wd.t().contiguous(), mask, "silu", bu, bd, config=cfg,
                          out=out, poison=True)
        assert_close_rel(out, _ref(x, wg, wu, wd, mask, "silu", bu, bd), torch.float32)


def test_compact_mode_is_chosen_for_experts_smaller_than_a_chunk():
    cfg = launch.FFNConfig(16, 32, 128, 1, 64, 128, 1)
    assert [launch.use_compact(cfg, ne) for ne in (16, 32, 63, 64, 128)] == [
        True, True, True, False, False]
    assert not launch.use_compact(dataclasses.replace(cfg, compact=False), 16)
    assert launch.use_compact(dataclasses.replace(cfg, compact=True), 128)


def test_default_config_compacts_large_experts_at_one_or_two_tokens_with_packed_w_down():
    for t, linear_down, want in ((1, False, True), (2, False, True), (1, True, None),
                                 (4, False, None)):
        cfg = launch.default_config(t, 4096, 14336, 132, False, 224, linear_down=linear_down)
        assert cfg.compact is want, (t, linear_down)
        assert launch.use_compact(cfg, 224) is bool(want)


def test_default_config_keeps_fp32_tiles_within_shared_memory():
    # 256-wide down slabs for small experts at T >= 3 need 240 KB of shared memory in fp32
    # (an H200 SM has 227 KB): only 2-byte weights get them
    wide = launch.default_config(4, 4096, 14336, 132, False, 16, elem_bytes=2)
    fp32 = launch.default_config(4, 4096, 14336, 132, False, 16, elem_bytes=4)
    assert (wide.down_block_d, fp32.down_block_d) == (256, 128)
    # and the 16-neuron nn.Linear W_down layout keeps plain launches (PDL measured slower)
    assert launch.default_config(4, 4096, 14336, 132, False, 32, linear_down=True).pdl
    assert not launch.default_config(4, 4096, 14336, 132, False, 16, linear_down=True).pdl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_routed_ffn_packed_public_op(dtype, gated):
    gen = torch.Generator().manual_seed(11)
    x, wg, wu, wd, bu, bd = _ffn(5, 40, 48, dtype, gated, not gated, gen)
    mask = (torch.rand(5, 8, generator=gen) < 0.5).to(DEV)
    act = "silu" if gated else "gelu"
    packed = ops.prepack_ffn(wg, wu, wd, b_up=bu, b_down=bd, activation=act)
    assert packed.w_down_t.shape == (48, 40) and packed.w_down_t.is_contiguous()
    ref = _ref(x, wg, wu, wd, mask, act, bu, bd)
    assert_close_rel(packed(x, mask, backend="triton"), ref, dtype)
    assert_close_rel(packed(x, mask, backend="torch"), ref, dtype)
    up = lambda w: None if w is None else w.double()  # noqa: E731
    ref2 = routed_ffn_packed_reference(up(x), up(wg), up(wu), up(packed.w_down_t), mask, act,
                                       up(bu), up(bd))
    assert_close_rel(ref2, ref, torch.float32)


def test_packed_bad_shape():
    x, wg, wu, wd, _, _ = _ffn(2, 8, 12, torch.float32, True, False, torch.Generator())
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="w_down_t"):
        ops.routed_ffn_packed(x, wg, wu, wd, mask)
    with pytest.raises(ValueError, match="w_down"):
        ops.prepack_ffn(wg, wu, wd.t())


@pytest.mark.parametrize("e", [5, 64, 100, 200, 448])  # > 128: the sorting tail
@pytest.mark.parametrize("budget", [0.3, "per_token"])
def test_route_large_and_odd_expert_counts(e, budget):
    gen = torch.Generator().manual_seed(e)
    t = 6
    logits = (torch.randn(t, e, generator=gen) * 2).to(DEV)
    b = torch.rand(t, generator=gen).to(DEV) if budget == "per_token" else budget
    bt = b if isinstance(b, torch.Tensor) else torch.full((t,), b, device=DEV)
    for lo, hi in ((1, e), (2, 3)):
        out = ops.route(logits, b, min_experts=lo, max_experts=hi, backend="triton")
        assert torch.equal(out, route_reference(logits, bt, lo, hi))


def test_route_ties_in_many_chunks():
    logits = torch.zeros(3, 130, device=DEV)
    logits[1, 70:] = 1.0
    out = ops.route(logits, torch.tensor([0.1, 0.5, 1.0], device=DEV), backend="triton")
    ref = route_reference(logits, torch.tensor([0.1, 0.5, 1.0], device=DEV), 1, 130)
    assert torch.equal(out, ref)


ROUTERS = {
    "linear": dict(r=None, act="none"),
    "linear_bias": dict(r=None, act="none", b1=True),
    "lowrank_gelu": dict(r=24, act="gelu", b1=True, b2=True),
    "lowrank_none": dict(r=16, act="none"),
}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e", [(1, 16), (9, 70), (3, 300)])  # 300: the sorting tail
def test_router_route_matches_reference(router, dtype, t, e):
    cfg = ROUTERS[router]
    gen = torch.Generator().manual_seed(hash((router, t, e)) % 2**31)
    d = 80
    r = cfg["r"] or e
    x = torch.randn(t, d, generator=gen).to(DEV, dtype)
    w1 = (torch.randn(r, d, generator=gen) / d**0.5 * 3).to(DEV, dtype)
    b1 = torch.randn(r, generator=gen).to(DEV) if cfg.get("b1") else None
    w2 = (torch.randn(e, r, generator=gen) / r**0.5 * 3).to(DEV) if cfg["r"] else None
    b2 = torch.randn(e, generator=gen).to(DEV) if cfg.get("b2") else None
    budget = torch.rand(t, generator=gen).to(DEV)
    kw = dict(b_router=b1, w_router_out=w2, b_router_out=b2, hidden_activation=cfg["act"])
    out = ops.router_route(x, w1, budget, backend="triton", **kw)
    logits = router_logits_reference(x, w1, b1, w2, b2, cfg["act"])
    ref = route_reference(logits, budget, 1, e)
    # the projection's summation order differs from torch's: a flip only where the budget
    # sits within rounding of the cumulative mass
    assert_mask_equal_up_to_rounding(out, ref, logits, budget)
    assert torch.equal(ops.router_route(x, w1, budget, backend="torch", **kw), ref)


def _budget_router_case(gen, low_rank, e=8, t=70):
    """70 tokens (two budget-check blocks), d=40, E=8; a linear or a rank-6 GELU router."""
    d = 40
    x = torch.randn(t, d, generator=gen).to(DEV)
    w1 = torch.randn(6 if low_rank else e, d, generator=gen).to(DEV)
    w2 = torch.randn(e, 6, generator=gen).to(DEV) if low_rank else None
    return t, e, x, w1, w2, "gelu" if low_rank else "none"


@pytest.mark.parametrize("low_rank", [False, True])
def test_router_route_kernel_budget_flag(low_rank):
    """The route kernel's budget check (used for GPU budget tensors, one device assert):
    ok only when every budget lies in [0, 1]; NaN is not ok. 70 tokens: two check blocks."""
    gen = torch.Generator().manual_seed(3)
    t, e, x, w1, w2, act = _budget_router_case(gen, low_rank)
    for bad, value in ((False, None), (True, 1.5), (True, -0.1), (True, float("nan"))):
        budget = torch.rand(t, generator=gen)
        if value is not None:
            budget[65] = value
        mask, ok = launch.router_route(x, w1, None, w2, None, act, budget.to(DEV), 1, e)
        assert bool(ok) is not bad
        if not bad:
            logits = router_logits_reference(x, w1, None, w2, None, act)
            assert (mask == route_reference(logits, budget.to(DEV), 1, e)).float().mean() > 0.95


@pytest.mark.parametrize("low_rank", [False, True])
def test_router_route_strided_budgets(low_rank):
    """A budget expanded to every token (stride 0, how a layer's one budget arrives) and a
    strided per-token budget are read in place, with the same masks as contiguous copies;
    the range check sees the strided values (one bad value expanded: not ok)."""
    gen = torch.Generator().manual_seed(5)
    t, e, x, w1, w2, act = _budget_router_case(gen, low_rank)
    kw = dict(w_router_out=w2, hidden_activation=act, backend="triton")
    one = torch.tensor([0.6], device=DEV)
    wide = torch.rand(2 * t, generator=gen).to(DEV)
    for strided in (one.expand(t), wide[::2]):
        assert not strided.is_contiguous()
        got = ops.router_route(x, w1, strided, **kw)
        assert torch.equal(got, ops.router_route(x, w1, strided.contiguous(), **kw))
    for bad in (1.5, float("nan")):
        _, ok = launch.router_route(x, w1, None, w2, None, act, torch.tensor([bad], device=DEV).expand(t), 1, e)
        assert not bool(ok)


def test_router_route_many_experts_low_rank_budgets():
    """Above 128 experts the low-rank router's second layer is its own kernel: the route
    kernel still checks the budgets (a bad one: not ok) and reads them strided."""
    gen = torch.Generator().manual_seed(6)
    t, e, x, w1, w2, act = _budget_router_case(gen, True, e=200, t=3)
    one = torch.tensor([0.6], device=DEV).expand(t)
    mask, ok = launch.router_route(x, w1, None, w2, None, act, one, 1, e)
    logits = router_logits_reference(x, w1, None, w2, None, act)
    assert bool(ok)
    assert_mask_equal_up_to_rounding(mask, route_reference(logits, one, 1, e), logits, one)
    _, ok = launch.router_route(x, w1, None, w2, None, act,
                                torch.tensor([0.5, float("nan"), 0.5], device=DEV), 1, e)
    assert not bool(ok)


def test_router_route_bad_input():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="w_router"):
        ops.router_route(x, torch.randn(4, 7, device=DEV), 0.5)
    with pytest.raises(ValueError, match="w_router_out"):
        ops.router_route(x, torch.randn(4, 8, device=DEV), 0.5,
                         w_router_out=torch.randn(6, 5, device=DEV))
    with pytest.raises(ValueError, match="hidden_activation"):
        ops.router_route(x, torch.randn(4, 8, device=DEV), 0.5, hidden_activation="tanh")


def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(5)
    x, wg, wu, wd, bu, bd = _ffn(3, 24, 32, torch.float32, True, True, gen)
    mask = (torch.rand(3, 4, generator=gen) < 0.5).to(DEV)
    budget = torch.rand(3, generator=gen).to(DEV)
    logits = torch.randn(3, 4, generator=gen).to(DEV)
    torch.library.opcheck(torch.ops.prunepath_triton.route.default, (logits, budget, 1, 4))
    torch.library.opcheck(torch.ops.prunepath_triton.routed_ffn.default,
                          (x, wg, wu, wd.t(), mask, "silu", bu, bd))
    torch.library.opcheck(torch.ops.prunepath_triton.router_route.default,
                          (x, wu[:4], None, None, None, "none", budget, 1, 4))


def test_torch_compile_traces_the_ops():
    gen = torch.Generator().manual_seed(6)
    x, wg, wu, wd, _, _ = _ffn(4, 24, 32, torch.float32, True, False, gen)
    logits = torch.randn(4, 8, generator=gen).to(DEV)

    def step(x, logits, budget):
        mask = ops.route(logits, budget, backend="triton")
        return ops.routed_ffn(x, wg, wu, wd, mask, backend="triton"), mask

    eager_out, eager_mask = step(x, logits, 0.6)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, mask = compiled(x, logits, 0.6)
    assert torch.equal(mask, eager_mask)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
