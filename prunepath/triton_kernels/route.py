"""Triton kernels for cumulative-mass routing (semantics: :func:`prunepath.ops.reference.route_reference`).

Rank formulation (no sort): with ``p`` the softmax of a token's logits, expert ``j`` is
ranked above expert ``i`` when ``p_j > p_i`` or (``p_j == p_i`` and ``j < i``), which is
exactly the order of a stable descending sort. Then

    rank_i        = #experts ranked above i
    mass_before_i = sum of p_j over the experts ranked above i
    take_i        = mass_before_i < budget  or  budget >= 1
    count         = clamp(sum_i take_i, min_experts, max_experts)
    mask_i        = rank_i < count

One program handles one token; the pairwise comparison is done in column chunks of
``BLOCK_J`` experts. Above 128 experts (``BLOCK_E > 128``) the [E, chunk] comparison no longer
fits in registers, and the tail sorts instead (:func:`_route_tail_sorted`: packed
probability/index keys, a bitonic ``tl.sort``, a cumulative sum) -- the same rule.

Two entry points share the tail of that computation:

* :func:`_route_kernel` — from logits ``[T, E]`` (the ``route`` op).
* :func:`_router_project_kernel` + :func:`_route_kernel` with ``KS > 1`` partial inputs
  (and an optional second low-rank matrix) — the fused router: ``x @ W^T`` is split over
  ``d`` into ``KS`` partial sums by the first kernel, which the route kernel adds up.
  Above 128 experts a low-rank router's second layer runs in its own many-program kernel,
  :func:`_router_out_kernel` (in the route kernel's one program per token it was latency
  bound: 21 / 36 us at E = 448 / 896 on an H200), which writes the logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ffn import _activate


@triton.jit
def _route_tail_sorted(p, offs_i, valid_i, b, min_e, max_e, E, BLOCK_E: tl.constexpr):
    """The same mask by sorting (E > 128): the pairwise [E, chunk] comparison of
    :func:`_route_tail` does not fit in registers there (an H200 took 631 us per token-batch
    at E = 448). Each expert's key is ``(bits of p) << 32 | (E-1-i)``: p >= 0, so its bits
    order like p, and equal p puts the lower index first -- a stable descending sort. The
    cumulative mass runs over the sorted p; the selected experts are those whose key is at
    least the ``count``-th largest."""
    pbits = p.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(valid_i, (pbits << 32) | (BLOCK_E - 1 - offs_i).to(tl.int64), -1)
    sk = tl.sort(key, descending=True)
    ps = (sk >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    ps = tl.where(sk >= 0, ps, 0.0)
    before = tl.cumsum(ps, axis=0) - ps  # mass of the experts ranked above
    b_eff = tl.where(b >= 1.0, float("inf"), b)  # budget >= 1 takes every expert
    take = (before < b_eff) & (offs_i < E)  # offs_i doubles as the sorted rank here
    count = tl.sum(take.to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(count, min_e), max_e)
    thr = tl.sum(tl.where(offs_i == count - 1, sk, 0), axis=0)
    return (key >= thr) & valid_i & (count > 0)


@triton.jit
def _route_tail(p, offs_i, valid_i, z_ptr_row, zmax, zsum, b, min_e, max_e, E,
                BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr, FROM_VECTOR: tl.constexpr):
    """Given probabilities ``p`` [BLOCK_E] of one token, return the bool mask [BLOCK_E]."""
    if BLOCK_E > 128:
        return _route_tail_sorted(p, offs_i, valid_i, b, min_e, max_e, E, BLOCK_E)
    mass = tl.zeros([BLOCK_E], dtype=tl.float32)
    rank = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j0 in tl.static_range(0, BLOCK_E, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        valid_j = offs_j < E
        # Compare the very values of ``p`` where possible: on a GPU a recomputed exp/div may
        # round differently from ``p``, and an expert then ranked above itself (found on an
        # H100: a tenth of the tokens off the rule). Self-comparisons are excluded as well.
        if BLOCK_J == BLOCK_E:
            pj = p  # one chunk: the token's own probabilities
        elif FROM_VECTOR:
            # probabilities already in registers: pick the chunk by a masked reduction
            sel = offs_i[:, None] == offs_j[None, :]
            pj = tl.sum(tl.where(sel, p[:, None], 0.0), axis=0)
        else:
            zj = tl.load(z_ptr_row + offs_j, mask=valid_j, other=0.0).to(tl.float32)
            pj = tl.exp(zj - zmax) / zsum
        pj = tl.where(valid_j, pj, 0.0)
        above = (pj[None, :] > p[:, None]) | (
            (pj[None, :] == p[:, None]) & (offs_j[None, :] < offs_i[:, None])
        )
        above = above & valid_j[None, :] & (offs_j[None, :] != offs_i[:, None])
        mass += tl.sum(tl.where(above, pj[None, :], 0.0), axis=1)
        rank += tl.sum(above.to(tl.int32), axis=1)
    b_eff = tl.where(b >= 1.0, float("inf"), b)  # budget >= 1 takes every expert
    take = (mass < b_eff) & valid_i
    count = tl.sum(take.to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(count, min_e), max_e)
    return (rank < count) & valid_i


@triton.jit
def _route_kernel(
    z_ptr, budget_ptr, mask_ptr, w2_ptr, b1_ptr, b2_ptr, ok_ptr,
    T, E, R, min_e, max_e,
    stride_zs, stride_zt, stride_mt, stride_w2e, stride_b,
    KS: tl.constexpr, LOW_RANK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HIDDEN_ACT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False, CHECK: tl.constexpr = False, BLOCK_B: tl.constexpr = 1,
    KS_P2: tl.constexpr = 1,
):
    """One token per program.

    Plain routing: ``z`` is the logits [T, E] (KS == 1). Fused router: ``z`` holds ``KS``
    partial projections [KS, T, R] that are summed (a fixed reduction), then ``+ b1``; with
    LOW_RANK the hidden ``act(z + b1)`` [R] goes through ``W2`` [E, R] (``+ b2``).
    HIDDEN_ACT: -1 none, else an id of :data:`prunepath.triton_kernels.ffn.ACT_IDS`.
    PDL: launched as a programmatic dependent of the projection kernel: the budget and the
    router's second layer are read before ``gdc_wait``, the partial projections after.
    CHECK: program 0 writes ``ok`` = every budget lies in [0, 1] (the caller asserts it).
    """
    t = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK_E)
    valid_i = offs_i < E
    # the KS partials are read as one [KS_P2, ...] tile (wide, independent loads; a loop of
    # 1-D loads became ~1000 scalar loads per thread for E = 64) and summed by tl.sum (a
    # fixed reduction tree: the same result on every run)
    offs_s = tl.arange(0, KS_P2)
    s_ok = offs_s < KS
    b = tl.load(budget_ptr + t * stride_b)  # stride 0: one budget broadcast to every token
    if CHECK:
        if t == 0:
            tl.store(ok_ptr, _budgets_ok(budget_ptr, T, stride_b, BLOCK_B))
    if LOW_RANK:  # (BLOCK_E <= 128: above, _router_out_kernel makes the logits first)
        z = _low_rank_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_i, valid_i, R, KS,
                             stride_zs, stride_zt, stride_w2e, HAS_B1, HAS_B2, HIDDEN_ACT,
                             BLOCK_R, KS_P2, PDL)
    else:
        if HAS_B1:
            b1 = tl.load(b1_ptr + offs_i, mask=valid_i, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        z = tl.sum(tl.load(z_ptr + offs_s[:, None] * stride_zs + t * stride_zt + offs_i[None, :],
                           mask=s_ok[:, None] & valid_i[None, :], other=0.0).to(tl.float32),
                   axis=0)
        if HAS_B1:
            z += b1
    # chunks of more than 64 experts re-read the logits from memory when they are there
    # (plain routing), else pick the probabilities out of the register vector
    FROM_VECTOR: tl.constexpr = LOW_RANK or KS > 1 or HAS_B1
    keep = _route_logits(z, offs_i, valid_i, z_ptr + t * stride_zt, b, min_e, max_e, E,
                         BLOCK_E, BLOCK_J, FROM_VECTOR)
    tl.store(mask_ptr + t * stride_mt + offs_i, keep, mask=valid_i)


@triton.jit
def _route_logits(z, offs_i, valid_i, z_ptr_row, b, min_e, max_e, E,
                  BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr, FROM_VECTOR: tl.constexpr):
    """One token's bool mask [BLOCK_E] from its fp32 logits ``z``: softmax, then the
    cumulative-mass rule (:func:`_route_tail`; ``z_ptr_row``: the logits in memory, read only
    without FROM_VECTOR)."""
    z = tl.where(valid_i, z, float("-inf"))
    zmax = tl.max(z, axis=0)
    ez = tl.where(valid_i, tl.exp(z - zmax), 0.0)
    zsum = tl.sum(ez, axis=0)
    return _route_tail(ez / zsum, offs_i, valid_i, z_ptr_row, zmax, zsum, b, min_e, max_e, E,
                       BLOCK_E, BLOCK_J, FROM_VECTOR)


@triton.jit
def _budgets_ok(budget_ptr, T, stride_b, BLOCK_B: tl.constexpr):
    """Whether every one of the T budgets lies in [0, 1] (NaN does not)."""
    good = tl.zeros([BLOCK_B], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_B):
        offs_b = t0 + tl.arange(0, BLOCK_B)
        bb = tl.load(budget_ptr + offs_b * stride_b, mask=offs_b < T, other=0.5)
        good += ((bb >= 0.0) & (bb <= 1.0)).to(tl.int32) - 1  # NaN fails both
    return tl.sum(good, axis=0) == 0


@triton.jit
def _router_project_kernel(
    x_ptr, w_ptr, out_ptr,
    T, D, R,
    stride_xt, stride_wr, stride_os, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Partial router projection: out[s, t, r] = sum over this split's d-range of x[t] * W[r]."""
    if PDL:  # the route kernel may start (its prologue reads no output of this one)
        tl.extra.cuda.gdc_launch_dependents()
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = offs_t < T
    r_ok = offs_r < R
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_start + kk + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_k[None, :],
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong
            acc = tl.dot(xk.to(tl.float32), tl.trans(wk.to(tl.float32)), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(xk, tl.trans(wk), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, tl.trans(wk), acc)
    tl.store(out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_r[None, :], acc,
             mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def _router_out_kernel(
    z_ptr, w2_ptr, b1_ptr, b2_ptr, out_ptr,
    T, E, R,
    stride_zs, stride_zt, stride_w2e, stride_ot,
    KS: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HIDDEN_ACT: tl.constexpr,
    BLOCK_EO: tl.constexpr, BLOCK_R: tl.constexpr, KS_P2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """A low-rank router's second layer for many experts: ``out[t, e-block]`` (fp32 logits) =
    ``act(sum_s z[s, t] + b1) @ W2[e-block]^T + b2``, one ``BLOCK_EO``-expert block per
    program (grid ``(cdiv(E, BLOCK_EO), T)``). PDL: a programmatic dependent of the
    projection kernel (W2 and the biases are read before the wait) and the primary of the
    route kernel."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_e = tl.program_id(0)
    t = tl.program_id(1)
    offs_e = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    e_ok = offs_e < E
    z = _low_rank_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, e_ok, R, KS, stride_zs,
                         stride_zt, stride_w2e, HAS_B1, HAS_B2, HIDDEN_ACT, BLOCK_R, KS_P2, PDL)
    tl.store(out_ptr + t * stride_ot + offs_e, z, mask=e_ok)


@triton.jit
def _low_rank_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, e_ok, R, KS,
                     stride_zs, stride_zt, stride_w2e,
                     HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HIDDEN_ACT: tl.constexpr,
                     BLOCK_R: tl.constexpr, KS_P2: tl.constexpr, PDL: tl.constexpr):
    """Token t's fp32 logits of experts ``offs_e``: ``act(sum_s z[s, t] + b1) @ W2^T + b2``
    (the KS projection partials summed by a fixed tl.sum tree). W2 and the biases are loaded
    before the PDL wait, the partials after it."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_s = tl.arange(0, KS_P2)
    w2 = tl.load(w2_ptr + offs_e[:, None] * stride_w2e + offs_r[None, :],
                 mask=e_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    if HAS_B1:
        b1 = tl.load(b1_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    if HAS_B2:
        b2 = tl.load(b2_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    zr = tl.sum(tl.load(z_ptr + offs_s[:, None] * stride_zs + t * stride_zt + offs_r[None, :],
                        mask=(offs_s < KS)[:, None] & r_ok[None, :], other=0.0).to(tl.float32),
                axis=0)
    if HAS_B1:
        zr += b1
    if HIDDEN_ACT >= 0:
        zr = _activate(zr, HIDDEN_ACT)
    zr = tl.where(r_ok, zr, 0.0)
    z = tl.sum(w2 * zr[None, :], axis=1)
    if HAS_B2:
        z += b2
    return z
