"""Triton kernels for the block-sparse routed FFN (semantics: :func:`prunepath.ops.reference.routed_ffn_reference`).

Two phases; grids and buffers depend on shapes only (never on the mask), no host sync:

1. ``_ffn_up_kernel``, grid ``(cdiv(F, BLOCK_N), KS, cdiv(T, BLOCK_T))``: one program owns
   ``BLOCK_N`` consecutive neurons (chunks are aligned to ``BLOCK_N``, not to experts, so any
   expert size works and weight loads stay vector-aligned) and one of ``KS`` slices of ``d``.
   A neuron is *live* when some token of the block chose its expert; weight rows of dead
   neurons are never loaded (predicated-off loads), and a program with no live neuron runs
   no loop iteration. With ``KS == 1`` it writes the activated, token-masked ``h`` [T, F] in
   the compute dtype; with ``KS > 1`` (more parallelism when few experts are live; T <= 2)
   fp32 partial pre-activations ``[KS, G, T, F]`` (G = 2 for gated FFNs) that phase 2 adds
   up. Every in-range element is written (zeros for dead neurons).
2. ``_ffn_down_kernel``, grid ``(cdiv(d, BLOCK_D), S, cdiv(T, BLOCK_T))``: one program owns a
   ``BLOCK_D`` slice of the output and every ``S``-th neuron chunk; it reads ``h`` and the
   live rows of ``W_down^T`` (any strides: a prepacked ``W_down^T [F, d]`` skips dead rows
   exactly; with nn.Linear's ``W_down [d, F]`` neurons are the contiguous axis, so a chunk
   with any live neuron is read whole to keep 16-byte loads), accumulating in fp32.
   ``S == 1`` writes the output (+ b_down) directly, else fp32 partials that
   ``_ffn_reduce_kernel`` sums (deterministic: no atomics).

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
def _ffn_up_kernel(
    x_ptr, wg_ptr, wu_ptr, bu_ptr, mask_ptr, out_ptr,
    T, D, F, NE,
    stride_xt, stride_wn, stride_mt, stride_os, stride_og, stride_ot,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr, KS: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TWO_EXPERTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < T
    n_ok = offs_n < F
    tok = _token_neuron_mask(mask_ptr, offs_t, pid_n * BLOCK_N, t_ok, n_ok, NE, F, stride_mt,
                             BLOCK_N, TWO_EXPERTS)
    live = tl.max(tok.to(tl.int32), axis=0) > 0  # [BLOCK_N]: some token needs this neuron

    acc_u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    # a program whose neurons are all dead runs no iteration (it only writes zeros below)
    k_end = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, K_PER_SPLIT, 0)
    for kk in range(0, k_end, BLOCK_K):
        offs_k = k_start + kk + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                     mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = live[:, None] & k_ok[None, :]
        w_off = offs_n[:, None] * stride_wn + offs_k[None, :]
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        acc_u = _dot(xk, tl.trans(wu), acc_u, IEEE, UPCAST)
        if GATED:
            wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
            acc_g = _dot(xk, tl.trans(wg), acc_g, IEEE, UPCAST)

    out_mask = t_ok[:, None] & n_ok[None, :]
    out_off = offs_t[:, None] * stride_ot + offs_n[None, :]
    if KS == 1:
        if HAS_BU:
            acc_u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = _activate(acc_g, ACT) * acc_u
        else:
            h = _activate(acc_u, ACT)
        h = tl.where(tok, h, 0.0)
        tl.store(out_ptr + out_off, h.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # every in-range element is written (zeros for dead neurons), so phase 2 can load
        # whole chunks with full-width loads
        base = out_ptr + pid_k * stride_os + out_off
        tl.store(base, acc_u, mask=out_mask)
        if GATED:
            tl.store(base + stride_og, acc_g, mask=out_mask)


@triton.jit
def _ffn_down_kernel(
    h_ptr, wd_ptr, bu_ptr, bd_ptr, mask_ptr, out_ptr,
    T, D, F, NE,
    stride_hs, stride_hg, stride_ht, stride_wn, stride_wd, stride_mt, stride_os, stride_ot,
    GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BD: tl.constexpr, ACT: tl.constexpr,
    KS: tl.constexpr, S: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TWO_EXPERTS: tl.constexpr, N_CONTIGUOUS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(F, BLOCK_N)
    for c in range(pid_s, n_chunks, S):
        offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < F
        tok = _token_neuron_mask(mask_ptr, offs_t, c * BLOCK_N, t_ok, n_ok, NE, F, stride_mt,
                                 BLOCK_N, TWO_EXPERTS)
        live = tl.max(tok.to(tl.int32), axis=0) > 0
        # one predicate for the whole chunk (a splat: constant along the contiguous axis)
        chunk_live = n_ok & ((tl.zeros([BLOCK_N], dtype=tl.int32)
                              + tl.max(live.to(tl.int32), axis=0)) > 0)
        # h is written for every neuron (zeros where dead): a chunk-wide predicate keeps the
        # loads full-width
        h_mask = t_ok[:, None] & chunk_live[None, :]
        h_off = offs_t[:, None] * stride_ht + offs_n[None, :]
        if KS == 1:
            h = tl.load(h_ptr + h_off, mask=h_mask, other=0.0)
        else:
            u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(KS):
                u += tl.load(h_ptr + s * stride_hs + h_off, mask=h_mask, other=0.0)
                if GATED:
                    g += tl.load(h_ptr + s * stride_hs + stride_hg + h_off, mask=h_mask,
                                 other=0.0)
            if HAS_BU:
                u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                hf = _activate(g, ACT) * u
            else:
                hf = _activate(u, ACT)
            h = tl.where(tok, hf, 0.0).to(wd_ptr.dtype.element_ty)
        if N_CONTIGUOUS:
            # nn.Linear W_down [d, F]: neurons are the contiguous axis, so a per-neuron
            # predicate would split the loads into 2-byte ones; load the whole chunk when any
            # of it is live (its dead neurons meet h = 0)
            w_mask = chunk_live[:, None] & d_ok[None, :]
        else:
            # packed W_down^T [F, d]: rows of dead neurons are skipped, loads stay wide
            w_mask = (live & n_ok)[:, None] & d_ok[None, :]
        w = tl.load(wd_ptr + offs_n[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                    mask=w_mask, other=0.0)
        acc = _dot(h, w, acc, IEEE, UPCAST)

    o_mask = t_ok[:, None] & d_ok[None, :]
    o_off = offs_t[:, None] * stride_ot + offs_d[None, :]
    if S == 1:
        if HAS_BD:
            acc += tl.load(bd_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(out_ptr + pid_s * stride_os + o_off, acc, mask=o_mask)


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
