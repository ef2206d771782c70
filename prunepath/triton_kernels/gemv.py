"""Triton kernel for a decode step's dense projections: ``y = x @ W^T + b`` for a few tokens.

A decode step's attention projections are matrix-vector products of a few MB to a few
tens of MB each (Llama-3-8B: q/o 32 MB, k/v 8 MB). cuBLAS runs them with split-K kernels
plus a reduce launch; at one token the reduces and the small k/v products kept those
projections at 1.6-3.1 TB/s on an H200 (BENCHMARKS.md, session 13 profile). This kernel
streams ``W`` once with no split of K: one program per ``BLOCK_N`` output rows (and per
``BLOCK_T`` tokens), fp32 accumulation, bias and the output cast in the same program.

Two reductions: ``USE_DOT`` (tensor cores on a ``[BLOCK_T, BLOCK_K] x [BLOCK_K, BLOCK_N]``
tile; tokens padded to 16) or, for one token, a broadcast multiply and row sum on the CUDA
cores. With ``PDL`` (sm_90+) the kernel is a programmatic dependent launch: each program
loads its first weight tile, which no earlier kernel writes, before it waits for the
previous kernel (``gdc_wait``) and reads ``x``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, T, N, K,
    stride_xt, stride_wn, stride_yt,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    t_ok = offs_t < T
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :]
    # the first weight tile does not depend on the previous kernel: load it before the wait
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if USE_DOT:
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        if k0 > 0:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            xv = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the CPU interpreter's bf16 dot is wrong
                acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                             input_precision="ieee")
            elif IEEE:
                acc = tl.dot(xv, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, tl.trans(w), acc)
        else:  # one token
            xv = tl.load(x_ptr + pid_t * stride_xt + k0 + offs_k, mask=k_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if USE_DOT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_t * stride_yt + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
