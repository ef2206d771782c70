"""Masked activation for the masked-dense FFN: ``h = act(g) * u`` (or ``act(u)``), each
token's inactive experts' neurons zeroed, in one elementwise pass.

It replaces the activation, the product and the mask multiply (three or four kernels) of a
dense FFN that applies a routing mask after its cuBLAS up projections; the inactive
neurons' ``g`` / ``u`` are not read. fp32 math, one rounding to the output dtype.
Grid: (tokens, cdiv(F, BLOCK)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ffn import ACT_IDS, _activate

BLOCK = 1024


@triton.jit
def _masked_act_kernel(g_ptr, u_ptr, mask_ptr, h_ptr, F, NPE, stride_g, stride_u, stride_m,
                       stride_h, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < F
    keep = tl.load(mask_ptr + t * stride_m + offs // NPE, mask=inb, other=0) != 0
    live = inb & keep
    u = tl.load(u_ptr + t * stride_u + offs, mask=live, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(g_ptr + t * stride_g + offs, mask=live, other=0.0).to(tl.float32)
        h = _activate(g, ACT) * u
    else:
        h = _activate(u, ACT)
    h = tl.where(keep, h, 0.0)
    tl.store(h_ptr + t * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=inb)


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
