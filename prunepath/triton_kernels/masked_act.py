"""Masked activation for the masked-dense FFN: ``h = act(g) * u`` (or ``act(u)``), each
token's inactive experts' neurons zeroed, in one elementwise pass.

It replaces the activation, the product and the mask multiply (three or four kernels) of a
dense FFN that applies a routing mask after its cuBLAS up projections; the inactive
neurons' ``g`` / ``u`` are not read. fp32 math, one rounding to the output dtype.

* :func:`masked_act`: the mask is given. Grid (tokens, cdiv(F, BLOCK)).
* :func:`routed_act`: the mask is made here, from the router's first projection ``z``
  (computed by the same GEMM as ``g`` and ``u`` when the weights are stacked): every program
  routes its token (bias, the low-rank router's second layer, softmax, the cumulative-mass
  rule of :mod:`.route`; E <= 128 is a [E, E] comparison, cheap beside the loads) and
  applies the mask to its ``EPB`` whole experts. Program 0 of each token stores the mask.
  Grid (tokens, cdiv(E, EPB)). No route kernel, no mask round trip through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ffn import ACT_IDS, _activate
from .route import _low_rank_logits, _route_logits

BLOCK = 1024


@triton.jit
def _masked_act_kernel(g_ptr, u_ptr, mask_ptr, h_ptr, F, NPE, stride_g, stride_u, stride_m,
                       stride_h, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < F
    keep = tl.load(mask_ptr + t * stride_m + offs // NPE, mask=inb, other=0) != 0
    _act_store(g_ptr + t * stride_g, u_ptr + t * stride_u, h_ptr + t * stride_h, offs,
               inb & keep, inb, GATED, ACT)


@triton.jit
def _act_store(g_row, u_row, h_row, offs, live, inb, GATED: tl.constexpr, ACT: tl.constexpr):
    """``h[offs] = act(g) * u`` (or ``act(u)``) where ``live``, 0 elsewhere in ``inb``; the
    dead neurons' g / u are not read."""
    u = tl.load(u_row + offs, mask=live, other=0.0).to(tl.float32)
    if GATED:
        h = _activate(tl.load(g_row + offs, mask=live, other=0.0).to(tl.float32), ACT) * u
    else:
        h = _activate(u, ACT)
    h = tl.where(live, h, 0.0)
    tl.store(h_row + offs, h.to(h_row.dtype.element_ty), mask=inb)


def masked_act(g: torch.Tensor | None, u: torch.Tensor, mask: torch.Tensor,
               activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, F]`` masked hidden state from pre-activations ``g``/``u`` ``[T, F]`` (row
    stride free, unit column stride) and a bool expert mask ``[T, E]`` (E divides F);
    written into ``out`` when given (tests pass a poisoned buffer)."""
    t, f = u.shape
    h = torch.empty((t, f), dtype=u.dtype, device=u.device) if out is None else out
    if t == 0 or f == 0:
        return h
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    gated = g is not None
    gp = g if gated else u
    grid = (t, triton.cdiv(f, BLOCK))
    _masked_act_kernel[grid](gp, u, m, h, f, f // mask.shape[1], gp.stride(0), u.stride(0),
                             m.stride(0), h.stride(0), GATED=gated, ACT=ACT_IDS[activation],
                             BLOCK=BLOCK, num_warps=4)
    return h


@triton.jit
def _routed_act_kernel(g_ptr, u_ptr, z_ptr, b1_ptr, w2_ptr, b2_ptr, budget_ptr, mask_ptr, h_ptr,
                       E, R, NPE, min_e, max_e,
                       stride_g, stride_u, stride_z, stride_w2e, stride_b, stride_m, stride_h,
                       GATED: tl.constexpr, ACT: tl.constexpr, LOW_RANK: tl.constexpr,
                       HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HIDDEN_ACT: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
                       EPB: tl.constexpr, BLOCK_N: tl.constexpr, ONE_CHUNK: tl.constexpr):
    t = tl.program_id(0)
    pe = tl.program_id(1)
    rows = pe * EPB + tl.arange(0, EPB)  # this program's experts
    rows_ok = rows < E
    cols = tl.arange(0, BLOCK_N)
    offs = rows[:, None] * NPE + cols[None, :]
    inb = rows_ok[:, None] & (cols < NPE)[None, :]
    if ONE_CHUNK:  # NPE <= BLOCK_N: its loads are issued before the routing, not after
        u0 = tl.load(u_ptr + t * stride_u + offs, mask=inb, other=0.0).to(tl.float32)
        if GATED:
            h0 = _activate(tl.load(g_ptr + t * stride_g + offs, mask=inb, other=0.0).to(tl.float32),
                           ACT) * u0
        else:
            h0 = _activate(u0, ACT)
    offs_e = tl.arange(0, BLOCK_E)
    valid_e = offs_e < E
    b = tl.load(budget_ptr + t * stride_b)
    if LOW_RANK:
        z = _low_rank_logits(z_ptr, w2_ptr, b1_ptr, b2_ptr, t, offs_e, valid_e, R, 1, 0,
                             stride_z, stride_w2e, HAS_B1, HAS_B2, HIDDEN_ACT, BLOCK_R, 1, False)
    else:
        z = tl.load(z_ptr + t * stride_z + offs_e, mask=valid_e, other=0.0).to(tl.float32)
        if HAS_B1:
            z += tl.load(b1_ptr + offs_e, mask=valid_e, other=0.0).to(tl.float32)
    keep = _route_logits(z, offs_e, valid_e, z_ptr, b, min_e, max_e, E, BLOCK_E, BLOCK_J, True)
    if pe == 0:
        tl.store(mask_ptr + t * stride_m + offs_e, keep.to(tl.uint8), mask=valid_e)
    sel = offs_e[None, :] == rows[:, None]
    keep_rows = tl.sum(tl.where(sel, keep.to(tl.int32)[None, :], 0), axis=1) != 0
    if ONE_CHUNK:
        h0 = tl.where(inb & keep_rows[:, None], h0, 0.0)
        tl.store(h_ptr + t * stride_h + offs, h0.to(h_ptr.dtype.element_ty), mask=inb)
        return
    for c0 in range(0, NPE, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * NPE + cols[None, :]
        inb = rows_ok[:, None] & (cols < NPE)[None, :]
        _act_store(g_ptr + t * stride_g, u_ptr + t * stride_u, h_ptr + t * stride_h, offs,
                   inb & keep_rows[:, None], inb, GATED, ACT)


def _routed_act_blocks(e: int, npe: int) -> tuple[int, int]:
    """(experts per program, neurons per expert chunk): whole experts, ~1024 neurons a program."""
    block_n = min(triton.next_power_of_2(npe), 256)
    return max(1, min(triton.next_power_of_2(e), 1024 // block_n)), block_n


def routed_act(g: torch.Tensor | None, u: torch.Tensor, z: torch.Tensor, b1, w2, b2,
               hidden_activation: str, budget: torch.Tensor, min_experts: int,
               max_experts: int, activation: str, out: torch.Tensor | None = None,
               mask_out: torch.Tensor | None = None,
               num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [T, F], mask [T, E] bool)``: each token routed from its router projection ``z``
    ``[T, R]`` (no bias: logits = ``z + b1``, or ``act(z + b1) @ w2^T + b2`` for a low-rank
    router), then :func:`masked_act` of that mask. ``g``/``u``/``z``: row stride free, unit
    column stride (slices of one GEMM output); ``budget`` fp32 [T], any stride. ``out`` /
    ``mask_out``: write there (tests pass poisoned buffers); ``num_warps`` for benchmarks."""
    t, f = u.shape
    e = z.shape[1] if w2 is None else w2.shape[0]
    r = z.shape[1]
    h = torch.empty((t, f), dtype=u.dtype, device=u.device) if out is None else out
    mask = torch.empty((t, e), dtype=torch.bool, device=u.device) if mask_out is None else mask_out
    if t == 0:
        return h, mask
    low = w2 is not None
    epb, block_n = _routed_act_blocks(e, f // e)
    block_e = triton.next_power_of_2(e)
    act = -1 if hidden_activation in (None, "none") else ACT_IDS[hidden_activation]
    gp = g if g is not None else u
    _routed_act_kernel[(t, triton.cdiv(e, epb))](
        gp, u, z, b1 if b1 is not None else z, w2 if low else z, b2 if b2 is not None else z,
        budget, mask.view(torch.uint8), h,
        e, r, f // e, min_experts, max_experts,
        gp.stride(0), u.stride(0), z.stride(0), w2.stride(0) if low else 0, budget.stride(0),
        mask.stride(0), h.stride(0),
        GATED=g is not None, ACT=ACT_IDS[activation], LOW_RANK=low, HAS_B1=b1 is not None,
        HAS_B2=low and b2 is not None, HIDDEN_ACT=act if low else -1,
        BLOCK_E=block_e, BLOCK_J=min(block_e, 128), BLOCK_R=triton.next_power_of_2(r),
        EPB=epb, BLOCK_N=block_n, ONE_CHUNK=f // e <= block_n, num_warps=num_warps,
    )
    return h, mask
