"""Triton kernels for the block-sparse routed FFN (semantics: :func:`prunepath.ops.reference.routed_ffn_reference`).

Two phases (plus a reduce); grids and buffers depend on shapes only (never on the mask), no
host sync:

0. The live-chunk list (:func:`_live_chunks`), computed in registers at the start of every
   program of both phases (no extra launch, no scratch memory, no atomics): the union over
   tokens of the mask [T, E] -> which *chunks* of ``BLOCK_N`` consecutive neurons hold a
   live neuron (chunks are aligned to ``BLOCK_N``, not to experts, so any expert size works
   and weight loads stay vector-aligned) -> a prefix sum gives each live chunk its place in
   the ascending list, and the neuron range [lo, hi) of its live neurons (exact when an
   expert has >= BLOCK_N neurons, else the whole chunk). Deterministic: the order is fixed.
   **COMPACT** mode (``launch.use_compact``: experts smaller than a chunk, e.g. 16 or 32
   neurons at E = 896 / 448 of F = 14336): a chunk would mostly hold dead neurons, so the
   list is instead the ascending live *experts* (:func:`_live_experts`: a prefix count of
   the union and a binary search of LOG2_E register gathers, no scratch memory), and work
   items are ``BLOCK_N``-neuron tiles of the compacted live-neuron list (the live experts'
   neurons back to back, :func:`_compact_tile`). The up kernel stores h (or its partials)
   at the compacted positions, so h stays dense and the down phase reads only live rows;
   with nn.Linear's W_down and a power-of-two expert size the down loads are shaped
   [experts, NE_VEC, d] (:func:`_compact_rows3`) so each expert's neurons stay a
   vectorized run. Positions past the list's end are masked, never stored.
1. ``_ffn_up_kernel``, grid ``(P, cdiv(T, BLOCK_T))``: the P programs loop over the work
   items (live chunk, d-split) of the list; rows of dead neurons are never loaded. With
   ``KS == 1`` it writes the activated, token-masked ``h`` [T, F] in the compute dtype;
   with ``KS > 1`` (T <= 2) fp32 partial pre-activations ``[KS, G, T, F]`` (G = 2 for gated
   FFNs) that phase 2 adds up; the step uses the fewest ``ks <= KS`` splits that give
   every SM a work item (1 at full density, 4 when 10% of the experts are live), computed
   on the device from the union's expert count. Only live chunks are written.
2. ``_ffn_down_kernel``, grid ``(cdiv(d, BLOCK_D), S, cdiv(T, BLOCK_T))``: one program owns a
   ``BLOCK_D`` slice of the output and every ``S``-th entry of the live-chunk list (the loop
   trip count follows the union of the mask, not F); it reads ``h`` of live neurons and
   the live rows of ``W_down^T`` (any strides: a prepacked ``W_down^T [F, d]`` skips dead
   rows exactly; with nn.Linear's ``W_down [d, F]`` neurons are the contiguous axis, so a
   listed chunk is read whole to keep 16-byte loads), accumulating in fp32.
   ``S == 1`` writes the output (+ b_down) directly, else fp32 partials. With FOLD (the
   default at T <= 2) the last program of each d-slab to finish (an arrival counter per
   slab, zeroed by the up kernel) sums the S partials and writes the output; else
   ``_ffn_reduce_kernel`` does (one more launch). Both sum in an order fixed at compile
   time, so results are deterministic; the counter is the only atomic.
   With PDL (T <= 2 on sm_90+) the down kernel is a programmatic dependent launch of the
   up kernel: its launch and live-list prologue overlap the up phase, and it waits
   (``gdc_wait``) before it reads ``h`` or the counters. (An L2 prefetch of each program's
   first W_down^T tiles before the wait was tried: no gain, +0..2.5 us; removed.)

Activations are computed in fp32: silu, gelu (erf), gelu_tanh, relu.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _activate(h, ACT: tl.constexpr):
    if ACT == 0:
        return h / (1.0 + tl.exp(-h))
    elif ACT == 1:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        # tanh(y) = 1 - 2 / (exp(2y) + 1), safe for large |y|
        th = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        return 0.5 * h * (1.0 + th)
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. IEEE: exact fp32 products (no tf32) for fp32
    inputs. UPCAST: compute in fp32 (the CPU interpreter's bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _token_neuron_mask(mask_ptr, offs_t, chunk_start, t_ok, n_ok, NE, F, stride_mt,
                       BLOCK_N: tl.constexpr, TWO_EXPERTS: tl.constexpr):
    """[BLOCK_T, BLOCK_N] bool: token t chose the expert of neuron ``chunk_start + j``.

    TWO_EXPERTS (host-checked ``NE >= BLOCK_N``): the chunk spans at most two experts, so
    two mask columns are loaded instead of one byte per (token, neuron)."""
    offs_n = chunk_start + tl.arange(0, BLOCK_N)
    if TWO_EXPERTS:
        e0 = chunk_start // NE
        m0 = tl.load(mask_ptr + offs_t * stride_mt + e0, mask=t_ok, other=0) != 0
        e1 = tl.minimum(e0 + 1, F // NE - 1)  # stays in range; only used where n < F
        m1 = tl.load(mask_ptr + offs_t * stride_mt + e1, mask=t_ok, other=0) != 0
        second = offs_n >= (e0 + 1) * NE
        tok = tl.where(second[None, :], m1[:, None], m0[:, None]) & n_ok[None, :]
    else:
        m = tl.load(mask_ptr + offs_t[:, None] * stride_mt + (offs_n // NE)[None, :],
                    mask=t_ok[:, None] & n_ok[None, :], other=0)
        tok = m != 0
    return tok


@triton.jit
def _union(mask_ptr, T, E, stride_mt, LIST_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BLOCK_E] int32: 1 where some token chose the expert (the union over tokens)."""
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    union = tl.zeros([BLOCK_E], dtype=tl.int32)
    for t0 in range(0, T, LIST_T):
        offs_t = t0 + tl.arange(0, LIST_T)
        m = tl.load(mask_ptr + offs_t[:, None] * stride_mt + offs_e[None, :],
                    mask=(offs_t < T)[:, None] & e_ok[None, :], other=0)
        union = tl.maximum(union, tl.max((m != 0).to(tl.int32), axis=0))
    return union


@triton.jit
def _live_chunks(mask_ptr, T, E, F, NE, stride_mt,
                 BN: tl.constexpr, TWO_EXPERTS: tl.constexpr, LIST_T: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """The step's live ``BN``-neuron chunks, computed in registers by every program that
    needs them (no extra launch, no global scratch, no atomics).

    Returns ``lo, hi, pos`` ([BLOCK_C], one entry per chunk) and ``n_live``: chunk c is the
    ``pos[c]``-th live chunk in ascending order (``pos = -1`` when dead) and [lo, hi) its
    live neurons: exact when experts have >= BN neurons (TWO_EXPERTS: a chunk spans at most
    two experts, its live neurons are contiguous), else the whole chunk."""
    union = _union(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < tl.cdiv(F, BN)
    start = c * BN
    end = tl.minimum(start + BN, F)
    e0 = tl.where(c_ok, start // NE, 0)
    e1 = tl.where(c_ok, (end - 1) // NE, 0)
    u0 = tl.gather(union, e0, axis=0)
    u1 = tl.gather(union, e1, axis=0)
    if TWO_EXPERTS:
        live = ((u0 + u1) > 0) & c_ok
        lo = tl.where(u0 > 0, start, e1 * NE)
        hi = tl.where(u1 > 0, end, e1 * NE)
    else:
        incl = tl.cumsum(union, axis=0)  # live experts <= e
        n_in = tl.gather(incl, e1, axis=0) - tl.gather(incl, e0, axis=0) + u0
        live = (n_in > 0) & c_ok
        lo = start
        hi = end
    live_i = live.to(tl.int32)
    pos = tl.where(live, tl.cumsum(live_i, axis=0) - 1, -1)
    return lo, hi, pos, tl.sum(live_i, axis=0), tl.sum(union, axis=0)


@triton.jit
def _live_experts(mask_ptr, T, E, stride_mt, LIST_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  LOG2_E: tl.constexpr):
    """COMPACT mode's list, in registers: ``live_e[k]`` is the k-th live expert of the union
    (ascending; entries k >= n_exp are in range but meaningless) and ``n_exp``.

    live_e[k] = #{e : incl[e] <= k} for the inclusive prefix count ``incl`` (nondecreasing),
    found by a binary search of LOG2_E register gathers."""
    union = _union(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E)
    incl = tl.cumsum(union, axis=0)
    k = tl.arange(0, BLOCK_E)
    pos = tl.zeros([BLOCK_E], dtype=tl.int32)
    for i in tl.static_range(LOG2_E):
        probe = pos + (BLOCK_E >> (i + 1))
        pos = tl.where(tl.gather(incl, probe - 1, axis=0) <= k, probe, pos)
    return pos, tl.sum(union, axis=0)


@triton.jit
def _compact_tile(live_e, i, NE, n_neur, BLOCK_N: tl.constexpr):
    """Tile i of the compacted list of live neurons (the live experts' neurons, in expert
    order): the positions ``c`` where its h is stored, which exist (``c < n_neur``), their
    neurons (rows of the weights) and experts (mask columns)."""
    c = i * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < n_neur
    k = tl.where(c_ok, c // NE, 0)
    ex = tl.gather(live_e, k, axis=0)
    return c, c_ok, ex * NE + (c - k * NE), ex


@triton.jit
def _compact_token_mask(mask_ptr, offs_t, t_ok, ex, live, stride_mt):
    """[BLOCK_T, BLOCK_N] bool for a compacted tile: token t chose expert ``ex[j]`` (one mask
    byte per (token, neuron); False past the list's end)."""
    return tl.load(mask_ptr + offs_t[:, None] * stride_mt + ex[None, :],
                   mask=t_ok[:, None] & live[None, :], other=0) != 0


@triton.jit
def _compact_rows3(live_e, i, n_exp, NE_VEC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile i's neurons as [experts, NE_VEC] (NE_VEC = experts' size, a power of two that
    divides BLOCK_N): keeps each expert's run of neurons visibly contiguous, so loads along
    the neuron axis of nn.Linear's W_down [d, F] stay vectorized."""
    KPT: tl.constexpr = BLOCK_N // NE_VEC
    ke = i * KPT + tl.arange(0, KPT)
    ke_ok = ke < n_exp
    ex = tl.gather(live_e, tl.where(ke_ok, ke, 0), axis=0)
    return ex[:, None] * NE_VEC + tl.arange(0, NE_VEC)[None, :], ke_ok


@triton.jit
def _listed(lo, hi, pos, j, F, BLOCK_N: tl.constexpr):
    """The j-th live chunk: its neuron offsets and which of them are live."""
    lo_j = tl.sum(tl.where(pos == j, lo, 0), axis=0)
    hi_j = tl.sum(tl.where(pos == j, hi, 0), axis=0)
    chunk_start = (lo_j // BLOCK_N) * BLOCK_N  # keeps the divisibility by BLOCK_N visible
    offs_n = chunk_start + tl.arange(0, BLOCK_N)
    return chunk_start, offs_n, (offs_n >= lo_j) & (offs_n < hi_j)


@triton.jit
def _up_splits(n_experts, NE, D, up_items, KS_MAX: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The step's split of d in the up phase: the fewest (<= KS_MAX) splits that make >=
    ``up_items`` work items of ``n_experts`` live experts' neurons in BLOCK_N-chunks (both
    phases compute it from the union's expert count). Returns (splits, BLOCK_K blocks per
    split)."""
    kb = tl.cdiv(D, BLOCK_K)
    ks = tl.cdiv(up_items, tl.maximum(tl.cdiv(n_experts * NE, BLOCK_N), 1))
    ks = tl.maximum(tl.minimum(tl.minimum(ks, KS_MAX), kb), 1)
    kpb = tl.cdiv(kb, ks)
    return tl.cdiv(kb, kpb), kpb


@triton.jit
def _live_chunks_kernel(mask_ptr, out_ptr, T, E, F, NE, D, stride_mt, up_items,
                        KS_MAX: tl.constexpr, BLOCK_K: tl.constexpr,
                        BN: tl.constexpr, TWO_EXPERTS: tl.constexpr, LIST_T: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """Testing aid: writes what the FFN kernels compute for themselves: ``out`` = [n_live,
    splits, blocks per split, lo_0, hi_0, lo_1, hi_1, ...] (the live chunks in order)."""
    lo, hi, pos, n_live, n_exp = _live_chunks(mask_ptr, T, E, F, NE, stride_mt, BN,
                                              TWO_EXPERTS, LIST_T, BLOCK_E, BLOCK_C)
    ks, kpb = _up_splits(n_exp, NE, D, up_items, KS_MAX, BLOCK_K, BN)
    tl.store(out_ptr, n_live)
    tl.store(out_ptr + 1, ks)
    tl.store(out_ptr + 2, kpb)
    tl.store(out_ptr + 3 + 2 * pos, lo, mask=pos >= 0)
    tl.store(out_ptr + 4 + 2 * pos, hi, mask=pos >= 0)


@triton.jit
def _ffn_up_kernel(
    x_ptr, wg_ptr, wu_ptr, bu_ptr, mask_ptr, out_ptr, hact_ptr, cnt_ptr,
    T, D, F, NE, E, up_items, n_cnt,
    stride_xt, stride_wn, stride_mt, stride_os, stride_og, stride_ot, stride_at,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr, KS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, TWO_EXPERTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LIST_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False, BLOCK_CNT: tl.constexpr = 0,
    COMPACT: tl.constexpr = False, LOG2_E: tl.constexpr = 0,
):
    """COMPACT: work items are tiles of the compacted live-neuron list, and h (or the
    partials) is stored at the compacted position; else aligned chunks, stored in place."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_t = tl.program_id(1)
    if PDL:
        # let the down kernel start (its launch, live list) on SMs this grid leaves
        # free; it waits for this grid to finish before it reads h
        tl.extra.cuda.gdc_launch_dependents()
    if BLOCK_CNT > 0:
        # zero the down phase's per-slab arrival counters (it uses them after this grid ends)
        if (pid == 0) & (pid_t == 0):
            offs_c = tl.arange(0, BLOCK_CNT)
            tl.store(cnt_ptr + offs_c, tl.zeros([BLOCK_CNT], dtype=tl.int32), mask=offs_c < n_cnt)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    if COMPACT:
        live_e, n_exp = _live_experts(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E, LOG2_E)
        n_neur = n_exp * NE
        n_live = tl.cdiv(n_neur, BLOCK_N)
    else:
        lo, hi, pos, n_live, n_exp = _live_chunks(mask_ptr, T, E, F, NE, stride_mt, BLOCK_N,
                                                  TWO_EXPERTS, LIST_T, BLOCK_E, BLOCK_C)
    ks, kpb = _up_splits(n_exp, NE, D, up_items, KS, BLOCK_K, BLOCK_N)
    # work items: (live chunk or tile j, d-split s), item = j * ks + s
    for item in range(pid, n_live * ks, n_prog):
        j = item // ks
        s = item - j * ks
        if COMPACT:
            # rows = the tile's neurons, all live; cols = where its h goes. The last tile's
            # tail (cols >= n_neur) computes and stores zeros: its weight loads are masked
            # and no token chose it (a store predicate of cols < F keeps the stores wide)
            cols, live, rows, ex = _compact_tile(live_e, j, NE, n_neur, BLOCK_N)
            n_ok = cols < F
            tok = _compact_token_mask(mask_ptr, offs_t, t_ok, ex, live, stride_mt)
        else:
            chunk_start, rows, in_range = _listed(lo, hi, pos, j, F, BLOCK_N)
            cols = rows
            n_ok = rows < F
            if TWO_EXPERTS:
                live = in_range
                tok = t_ok[:, None] & in_range[None, :]  # placeholder: the epilogue loads it
            else:
                tok = _token_neuron_mask(mask_ptr, offs_t, chunk_start, t_ok, n_ok, NE, F,
                                         stride_mt, BLOCK_N, TWO_EXPERTS)
                live = tl.max(tok.to(tl.int32), axis=0) > 0
        acc_u, acc_g = _up_tile(x_ptr, wg_ptr, wu_ptr, offs_t, t_ok, rows, live,
                                (s * kpb) * BLOCK_K, kpb, D, stride_xt, stride_wn, GATED,
                                IEEE, UPCAST, BLOCK_T, BLOCK_N, BLOCK_K)

        if not COMPACT:
            if TWO_EXPERTS:  # loaded after the k-loop (its registers are free by now)
                tok = _token_neuron_mask(mask_ptr, offs_t, chunk_start, t_ok, n_ok, NE, F,
                                         stride_mt, BLOCK_N, TWO_EXPERTS)
        out_mask = t_ok[:, None] & n_ok[None, :]
        if KS == 1:
            _store_activated(acc_u, acc_g, out_ptr + offs_t[:, None] * stride_ot + cols[None, :],
                             out_mask, bu_ptr, rows, n_ok, tok, GATED, HAS_BU, ACT)
        elif ks == 1:  # this step needs no split: write h activated, as with KS == 1
            _store_activated(acc_u, acc_g, hact_ptr + offs_t[:, None] * stride_at + cols[None, :],
                             out_mask, bu_ptr, rows, n_ok, tok, GATED, HAS_BU, ACT)
        else:
            base = out_ptr + s * stride_os + offs_t[:, None] * stride_ot + cols[None, :]
            tl.store(base, acc_u, mask=out_mask)
            if GATED:
                tl.store(base + stride_og, acc_g, mask=out_mask)


@triton.jit
def _store_activated(acc_u, acc_g, ptrs, out_mask, bu_ptr, rows, n_ok, tok,
                     GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr):
    """h = act(gate) * (up + b_up) (or act(up + b_up)), zero where the token did not choose
    the neuron's expert (``tok``), stored in the pointers' dtype; ``rows``: the neurons."""
    h = _hidden(acc_u, acc_g, bu_ptr, rows, n_ok, tok, GATED, HAS_BU, ACT)
    tl.store(ptrs, h.to(ptrs.dtype.element_ty), mask=out_mask)


@triton.jit
def _hidden(acc_u, acc_g, bu_ptr, rows, n_ok, tok,
            GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr):
    """fp32 h = act(gate) * (up + b_up) (or act(up + b_up)), 0 where ``tok`` is False."""
    if HAS_BU:
        acc_u += tl.load(bu_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _activate(acc_g, ACT) * acc_u
    else:
        h = _activate(acc_u, ACT)
    return tl.where(tok, h, 0.0)


@triton.jit
def _up_tile(x_ptr, wg_ptr, wu_ptr, offs_t, t_ok, rows, live, k_start, n_kb, D,
             stride_xt, stride_wn, GATED: tl.constexpr, IEEE: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """fp32 (x @ W_up[rows]^T, x @ W_gate[rows]^T) [BLOCK_T, BLOCK_N] over the ``n_kb``
    BLOCK_K-blocks of d from ``k_start``; weight rows where ``live`` is False are not read."""
    acc_u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for kb in range(0, n_kb):
        offs_k = k_start + kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = live[:, None] & k_ok[None, :]
        w_off = rows[:, None] * stride_wn + offs_k[None, :]
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        acc_u = _dot(xk, tl.trans(wu), acc_u, IEEE, UPCAST)
        if GATED:
            wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
            acc_g = _dot(xk, tl.trans(wg), acc_g, IEEE, UPCAST)
    return acc_u, acc_g


@triton.jit
def _down_loop(acc, h_ptr, wd_ptr, bu_ptr, mask_ptr, lo, hi, pos, n_live, live_e, n_exp, ks,
               pid_s, offs_t, t_ok, offs_d, d_ok, F, NE,
               stride_hs, stride_hg, stride_ht, stride_wn, stride_wd, stride_mt,
               PARTIAL: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr,
               ACT: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               TWO_EXPERTS: tl.constexpr, N_CONTIGUOUS: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               COMPACT: tl.constexpr, NE_VEC: tl.constexpr):
    """acc += h[:, chunk] @ W_down^T[chunk, d-slab] over this program's share of the listed
    (live) chunks, or with COMPACT of the compacted list's tiles (``n_live`` of them): the
    trip count follows the mask's union, not F. PARTIAL: h is the sum of ``ks`` fp32
    partial pre-activations, activated here (a nested loop: not pipelined); else the
    activated h (a flat loop, software-pipelined)."""
    for i in range(pid_s, n_live, S):
        if COMPACT:
            # h is stored compacted: every position < n_exp * NE was written, none is dead;
            # the loads are predicated on cols < F (wide loads) and the tail dropped by a select
            cols, live, rows, ex = _compact_tile(live_e, i, NE, n_exp * NE, BLOCK_N)
            n_ok = cols < F
            if PARTIAL:
                tok = _compact_token_mask(mask_ptr, offs_t, t_ok, ex, live, stride_mt)
        else:
            chunk_start, rows, in_range = _listed(lo, hi, pos, i, F, BLOCK_N)
            cols = rows
            n_ok = rows < F
            if TWO_EXPERTS:
                live = in_range
                if PARTIAL:
                    tok = _token_neuron_mask(mask_ptr, offs_t, chunk_start, t_ok, n_ok, NE, F,
                                             stride_mt, BLOCK_N, TWO_EXPERTS)
            else:
                tok = _token_neuron_mask(mask_ptr, offs_t, chunk_start, t_ok, n_ok, NE, F,
                                         stride_mt, BLOCK_N, TWO_EXPERTS)
                live = tl.max(tok.to(tl.int32), axis=0) > 0
        # chunks: h is only written in the up phase's live chunks, so a neuron outside this
        # chunk's live range may hold garbage, which a select (not a multiply) drops; the
        # loads stay full-width (one predicate per token row)
        h_mask = t_ok[:, None] & n_ok[None, :]
        h_off = offs_t[:, None] * stride_ht + cols[None, :]
        if not PARTIAL:
            h = tl.load(h_ptr + h_off, mask=h_mask, other=0.0)
            if COMPACT:
                h = tl.where(live[None, :], h, 0.0)
            else:
                if TWO_EXPERTS:
                    h = tl.where(in_range[None, :], h, 0.0)
                else:  # tok implies live (and avoids a Triton 3.6 layout bug with live[None, :])
                    h = tl.where(tok, h, 0.0)
        else:
            u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            # a dynamic loop over the step's splits: it keeps the chunk loop from being
            # software-pipelined, but an unrolled one would stage KS fp32 tiles in shared
            # memory (166 KB at KS = 8: one program per SM); at T <= 2 many small programs
            # per SM keep more weight bytes in flight
            for s in range(0, ks):
                u += tl.load(h_ptr + s * stride_hs + h_off, mask=h_mask, other=0.0)
                if GATED:
                    g += tl.load(h_ptr + s * stride_hs + stride_hg + h_off, mask=h_mask,
                                 other=0.0)
            if HAS_BU:
                u += tl.load(bu_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                hf = _activate(g, ACT) * u
            else:
                hf = _activate(u, ACT)
            if TWO_EXPERTS and not COMPACT:
                h = tl.where(tok & in_range[None, :], hf, 0.0)
            else:
                h = tl.where(tok, hf, 0.0)  # tok implies live
            h = h.to(wd_ptr.dtype.element_ty)
        if COMPACT and NE_VEC > 0:
            # nn.Linear W_down [d, F] with power-of-two experts: load [experts, NE_VEC, d]
            # so each expert's neurons are one contiguous (vectorized) run, then flatten
            rows3, ke_ok = _compact_rows3(live_e, i, n_exp, NE_VEC, BLOCK_N)
            w3 = tl.load(wd_ptr + rows3[:, :, None] * stride_wn
                         + offs_d[None, None, :] * stride_wd,
                         mask=ke_ok[:, None, None] & d_ok[None, None, :], other=0.0)
            w = tl.reshape(w3, [BLOCK_N, w3.shape[2]])
        else:
            if COMPACT:
                w_mask = live[:, None] & d_ok[None, :]
            elif N_CONTIGUOUS:
                # nn.Linear W_down [d, F]: neurons are the contiguous axis, so a per-neuron
                # predicate would split the loads into 2-byte ones; load the whole listed
                # chunk (its dead neurons meet h = 0)
                w_mask = n_ok[:, None] & d_ok[None, :]
            else:
                # packed W_down^T [F, d]: rows of dead neurons are skipped, loads stay wide
                w_mask = (live & n_ok)[:, None] & d_ok[None, :]
            w = tl.load(wd_ptr + rows[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                        mask=w_mask, other=0.0)
        acc = _dot(h, w, acc, IEEE, UPCAST)

    return acc


@triton.jit
def _ffn_down_kernel(
    h_ptr, hact_ptr, wd_ptr, bu_ptr, bd_ptr, mask_ptr, out_ptr, cnt_ptr, fin_ptr,
    T, D, F, NE, E, up_items,
    stride_hs, stride_hg, stride_ht, stride_at, stride_wn, stride_wd, stride_mt, stride_os,
    stride_ot, stride_ft,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BD: tl.constexpr, ACT: tl.constexpr,
    KS: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TWO_EXPERTS: tl.constexpr, N_CONTIGUOUS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UP_BLOCK_N: tl.constexpr, UP_BLOCK_K: tl.constexpr,
    LIST_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False, FOLD: tl.constexpr = False, S_P2: tl.constexpr = 1,
    COMPACT: tl.constexpr = False, LOG2_E: tl.constexpr = 0, NE_VEC: tl.constexpr = 0,
):
    """FOLD (S > 1): each program writes its fp32 partial, then counts its arrival on the
    slab's counter (zeroed by the up kernel); the last of the slab's S programs sums the S
    partials with a reduction fixed at compile time (deterministic whichever program is
    last) and writes the output: no reduce launch. PDL: launched as a programmatic
    dependent of the up kernel; everything before ``gdc_wait`` reads only the mask and the
    weights. COMPACT: h holds the compacted live neurons (as the up kernel wrote them);
    NE_VEC > 0: vectorized loads of nn.Linear's W_down by whole experts of NE_VEC neurons."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if COMPACT:
        live_e, n_exp = _live_experts(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E, LOG2_E)
        n_live = tl.cdiv(n_exp * NE, BLOCK_N)
        lo = live_e  # unused in this mode
        hi = live_e
        pos = live_e
    else:
        lo, hi, pos, n_live, n_exp = _live_chunks(mask_ptr, T, E, F, NE, stride_mt, BLOCK_N,
                                                  TWO_EXPERTS, LIST_T, BLOCK_E, BLOCK_C)
        live_e = lo  # unused in this mode
    if PDL:
        tl.extra.cuda.gdc_wait()  # the up kernel's h (and zeroed counters) from here on
    if KS == 1:
        acc = _down_loop(acc, h_ptr, wd_ptr, bu_ptr, mask_ptr, lo, hi, pos, n_live, live_e,
                         n_exp, 1, pid_s, offs_t, t_ok, offs_d, d_ok, F, NE, stride_hs,
                         stride_hg, stride_ht, stride_wn, stride_wd, stride_mt, False, GATED,
                         HAS_BU, ACT, S, IEEE, UPCAST, TWO_EXPERTS, N_CONTIGUOUS, BLOCK_T,
                         BLOCK_N, COMPACT, NE_VEC)
    else:
        # the up phase's split count (same formula, same inputs)
        ks, _kpb = _up_splits(n_exp, NE, D, up_items, KS, UP_BLOCK_K, UP_BLOCK_N)
        if ks == 1:  # the up phase wrote h activated (dense-ish steps): the pipelined loop
            acc = _down_loop(acc, hact_ptr, wd_ptr, bu_ptr, mask_ptr, lo, hi, pos, n_live,
                             live_e, n_exp, 1, pid_s, offs_t, t_ok, offs_d, d_ok, F, NE, 0, 0,
                             stride_at, stride_wn, stride_wd, stride_mt, False, GATED, HAS_BU,
                             ACT, S, IEEE, UPCAST, TWO_EXPERTS, N_CONTIGUOUS, BLOCK_T, BLOCK_N,
                             COMPACT, NE_VEC)
        else:
            acc = _down_loop(acc, h_ptr, wd_ptr, bu_ptr, mask_ptr, lo, hi, pos, n_live,
                             live_e, n_exp, ks, pid_s, offs_t, t_ok, offs_d, d_ok, F, NE,
                             stride_hs, stride_hg, stride_ht, stride_wn, stride_wd, stride_mt,
                             True, GATED, HAS_BU, ACT, S, IEEE, UPCAST, TWO_EXPERTS,
                             N_CONTIGUOUS, BLOCK_T, BLOCK_N, COMPACT, NE_VEC)

    o_mask = t_ok[:, None] & d_ok[None, :]
    o_off = offs_t[:, None] * stride_ot + offs_d[None, :]
    if S == 1:
        if HAS_BD:
            acc += tl.load(bd_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(out_ptr + pid_s * stride_os + o_off, acc, mask=o_mask)
        if FOLD:
            # every thread's partial is stored before one thread releases the arrival
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_t * tl.num_programs(0) + pid_d, 1,
                                    sem="acq_rel", scope="gpu")
            if arrived == S - 1:  # the slab's last program sums the S partials
                # per token row, one [S, BLOCK_D] tile: S independent wide loads in flight (a
                # loop over s serializes S L2 round trips), summed by tl.sum -- a fixed
                # reduction tree, so the result does not depend on which program came last
                offs_s = tl.arange(0, S_P2)
                s_ok = offs_s < S
                if HAS_BD:
                    bd = tl.load(bd_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
                for r in range(0, tl.minimum(T - pid_t * BLOCK_T, BLOCK_T)):
                    row = pid_t * BLOCK_T + r
                    part = tl.load(out_ptr + offs_s[:, None] * stride_os + row * stride_ot
                                   + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                                   other=0.0, cache_modifier=".cg")
                    tot = tl.sum(part, axis=0)
                    if HAS_BD:
                        tot += bd
                    tl.store(fin_ptr + row * stride_ft + offs_d,
                             tot.to(fin_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _ffn_reduce_kernel(part_ptr, bd_ptr, out_ptr, N, D, stride_ps,
                       S: tl.constexpr, HAS_BD: tl.constexpr, BLOCK: tl.constexpr):
    """out.flat[i] = sum_s part[s].flat[i] (+ b_down[i % D]), cast to the output dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=ok, other=0.0)
    if HAS_BD:
        acc += tl.load(bd_ptr + offs % D, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
