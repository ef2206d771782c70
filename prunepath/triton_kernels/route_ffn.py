"""Routing and the routed FFN in one kernel, for one or two tokens (semantics: the router's
mask as :func:`prunepath.ops.router_route` computes it, then
:func:`prunepath.ops.reference.routed_ffn_reference` with it).

After the router projection kernel (``route._router_project_kernel``: KS partial sums of
``x @ W1^T`` split over d), ``_route_ffn_fused_kernel`` is the fused FFN kernel
(``ffn._ffn_fused_kernel``) whose prologue routes instead of reading a mask: every program
sums the projection partials of its token block, applies a low-rank router's second layer,
takes the softmax and the cumulative-mass rule (``route._route_logits``), and so knows the live
experts without a route kernel between the two launches; program 0 of each token block writes
the mask rows (the op's second output). The work is repeated in every program: a few KB of
L2 reads and a [tokens, E] computation against the tile loop's megabytes.

``_route_up_kernel`` is the same prologue (:func:`_route_prologue`) in front of the two-phase
FFN's up kernel (``ffn._ffn_up_kernel``'s work items on the compacted list, ``ffn._up_work``);
the down kernel (``ffn._ffn_down_kernel`` with MASK_FROM_PRIMARY) reads the mask that program
0 stored, after its programmatic-dependent-launch wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ffn import _fused_tiles, _live_from_union, _up_work, _zero_counters
from .route import _budgets_ok, _low_rank_logits, _route_logits


@triton.jit
def _token_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, e_ok, R, KS,
                  stride_zs, stride_zt, stride_w2e,
                  LOW_RANK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                  HIDDEN_ACT: tl.constexpr, BLOCK_R: tl.constexpr, KS_P2: tl.constexpr):
    """Token t's fp32 router logits [BLOCK_E] from the KS projection partials."""
    if LOW_RANK:
        z = _low_rank_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, e_ok, R, KS, stride_zs,
                             stride_zt, stride_w2e, HAS_B1, HAS_B2, HIDDEN_ACT, BLOCK_R, KS_P2,
                             False)
    else:
        offs_s = tl.arange(0, KS_P2)
        z = tl.sum(tl.load(z_ptr + offs_s[:, None] * stride_zs + t * stride_zt + offs_e[None, :],
                           mask=(offs_s < KS)[:, None] & e_ok[None, :], other=0.0), axis=0)
        if HAS_B1:
            z += tl.load(b1_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    return z


@triton.jit
def _route_prologue(z_ptr, budget_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr, mask_ptr, pid, pid_t,
                    T, E, R, KS, min_e, max_e, stride_zs, stride_zt, stride_w2e, stride_b,
                    stride_mt, LOW_RANK: tl.constexpr, HAS_B1: tl.constexpr,
                    HAS_B2: tl.constexpr, HIDDEN_ACT: tl.constexpr, BLOCK_J: tl.constexpr,
                    BLOCK_R: tl.constexpr, KS_P2: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, LOG2_E: tl.constexpr,
                    PDL: tl.constexpr):
    """The routing-in-the-FFN kernels' prologue: program (0, 0) writes ``ok`` (every budget in
    [0, 1]); with PDL, wait for the projection kernel; route the token block from the
    projection's KS partials (program ``pid`` 0 stores the mask rows). Returns the rows
    [BLOCK_T, BLOCK_E] (int32) and the live-expert list of their union."""
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    if (pid == 0) & (pid_t == 0):
        tl.store(ok_ptr, _budgets_ok(budget_ptr, T, stride_b, BLOCK_B))
    if PDL:
        tl.extra.cuda.gdc_wait()  # the projection's partials from here on
    rows = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for r in range(0, tl.minimum(T - pid_t * BLOCK_T, BLOCK_T)):
        t = pid_t * BLOCK_T + r
        z = _token_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, e_ok, R, KS, stride_zs,
                          stride_zt, stride_w2e, LOW_RANK, HAS_B1, HAS_B2, HIDDEN_ACT, BLOCK_R,
                          KS_P2)
        b = tl.load(budget_ptr + t * stride_b)
        keep = _route_logits(z, offs_e, e_ok, z_ptr, b, min_e, max_e, E, BLOCK_E, BLOCK_J, True)
        if pid == 0:  # the op's mask (and the down kernel's, after the up kernel)
            tl.store(mask_ptr + t * stride_mt + offs_e, keep, mask=e_ok)
        rows = tl.where((tl.arange(0, BLOCK_T) == r)[:, None], keep.to(tl.int32)[None, :], rows)
    live_e, n_exp = _live_from_union(tl.max(rows, axis=0), BLOCK_E, LOG2_E)
    return rows, live_e, n_exp


@triton.jit
def _route_ffn_fused_kernel(
    z_ptr, budget_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr, mask_ptr,
    x_ptr, wg_ptr, wu_ptr, bu_ptr, wd_ptr, part_ptr,
    T, D, NE, E, R, min_e, max_e,
    stride_zs, stride_zt, stride_w2e, stride_b, stride_mt,
    stride_xt, stride_wn, stride_dn, stride_dd, stride_pp, stride_pt,
    KS: tl.constexpr, LOW_RANK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    KS_P2: tl.constexpr, BLOCK_B: tl.constexpr,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, LOG2_E: tl.constexpr, PDL: tl.constexpr = False,
):
    """Grid ``(P, cdiv(T, BLOCK_T))``. PDL: a programmatic dependent of the projection kernel
    (waits for its partials) and the primary of the partials reduce. Program (0, 0) also
    writes ``ok`` = every budget lies in [0, 1]."""
    DOT: tl.constexpr = BLOCK_T >= 16
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_t = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows, live_e, n_exp = _route_prologue(
        z_ptr, budget_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr, mask_ptr, pid, pid_t, T, E, R, KS,
        min_e, max_e, stride_zs, stride_zt, stride_w2e, stride_b, stride_mt, LOW_RANK, HAS_B1,
        HAS_B2, HIDDEN_ACT, BLOCK_J, BLOCK_R, KS_P2, BLOCK_B, BLOCK_T, BLOCK_E, LOG2_E, PDL)
    _fused_tiles(x_ptr, wg_ptr, wu_ptr, bu_ptr, wd_ptr, mask_ptr, rows, part_ptr, live_e, n_exp,
                 pid, n_prog, offs_t, t_ok, D, NE, stride_xt, stride_wn, stride_dn, stride_dd,
                 stride_mt, stride_pp, stride_pt, GATED, HAS_BU, ACT, IEEE, UPCAST, DOT, True,
                 BLOCK_T, BLOCK_N, BLOCK_K, BLOCK_D)


@triton.jit
def _route_up_kernel(
    z_ptr, budget_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr, mask_ptr,
    x_ptr, wg_ptr, wu_ptr, bu_ptr, out_ptr, hact_ptr, cnt_ptr,
    T, D, F, NE, E, R, min_e, max_e, up_items, n_cnt,
    stride_zs, stride_zt, stride_w2e, stride_b, stride_mt,
    stride_xt, stride_wn, stride_os, stride_og, stride_ot, stride_at,
    RKS: tl.constexpr, LOW_RANK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HIDDEN_ACT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    KS_P2: tl.constexpr, BLOCK_B: tl.constexpr,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr, KS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, LOG2_E: tl.constexpr, PDL: tl.constexpr = False,
    BLOCK_CNT: tl.constexpr = 0,
):
    """The two-phase FFN's up kernel (``ffn._ffn_up_kernel`` on the compacted list) with the
    routing in its prologue, grid ``(P, cdiv(T, BLOCK_T))``: every program routes its token
    block from the router projection's RKS partials (:func:`_route_prologue`; program 0
    stores the mask rows, which ``ffn._ffn_down_kernel`` with MASK_FROM_PRIMARY reads after its
    wait), then takes its up work items. PDL: a programmatic dependent of the projection
    kernel and the primary of the down kernel. Program (0, 0) writes ``ok`` (every budget
    in [0, 1]) and zeroes the down phase's arrival counters."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_t = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the down kernel waits for this grid
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    _zero_counters(cnt_ptr, n_cnt, pid, pid_t, BLOCK_CNT)
    rows, live_e, n_exp = _route_prologue(
        z_ptr, budget_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr, mask_ptr, pid, pid_t, T, E, R, RKS,
        min_e, max_e, stride_zs, stride_zt, stride_w2e, stride_b, stride_mt, LOW_RANK, HAS_B1,
        HAS_B2, HIDDEN_ACT, BLOCK_J, BLOCK_R, KS_P2, BLOCK_B, BLOCK_T, BLOCK_E, LOG2_E, PDL)
    _up_work(x_ptr, wg_ptr, wu_ptr, bu_ptr, mask_ptr, rows, out_ptr, hact_ptr, live_e, live_e,
             live_e, tl.cdiv(n_exp * NE, BLOCK_N), live_e, n_exp, pid, n_prog, offs_t, t_ok, D,
             F, NE, up_items, stride_xt, stride_wn, stride_mt, stride_os, stride_og, stride_ot,
             stride_at, GATED, HAS_BU, ACT, KS, IEEE, UPCAST, False, True, True,
             BLOCK_T, BLOCK_N, BLOCK_K)
