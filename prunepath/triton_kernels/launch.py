"""Host-side launchers for the Triton kernels: block-size heuristics, buffers, grids.

Everything here depends only on shapes and dtypes (never on tensor contents), so the
launches are safe inside CUDA graphs and behind torch.compile's custom-op boundary.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from . import ffn as _ffn
from . import route as _route


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    if _interpreted(t):
        return 4
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------ route


def route(logits: torch.Tensor, budget: torch.Tensor, min_experts: int, max_experts: int):
    """Bool mask [T, E] (see :mod:`prunepath.triton_kernels.route`)."""
    t, e = logits.shape
    mask = torch.empty((t, e), dtype=torch.bool, device=logits.device)
    if t == 0:
        return mask
    block_e = triton.next_power_of_2(e)
    _route._route_kernel[(t,)](
        logits, budget, mask, logits, logits, logits,
        t, e, e, min_experts, max_experts,
        0, logits.stride(0), mask.stride(0), 0,
        KS=1, LOW_RANK=False, HAS_B1=False, HAS_B2=False, HIDDEN_ACT=-1,
        BLOCK_E=block_e, BLOCK_J=min(block_e, 64), BLOCK_R=1,
        num_warps=4 if block_e <= 64 else 8,
    )
    return mask


def router_route(x, w1, b1, w2, b2, hidden_activation, budget, min_experts, max_experts):
    """Fused router + routing: logits = ``x @ w1^T + b1`` (linear router, w1 [E, d]) or
    ``act(x @ w1^T + b1) @ w2^T + b2`` (low-rank router, w1 [R, d], w2 [E, R]) -> mask [T, E].

    The projection is split over ``d`` into KS partial sums (enough programs to read the
    router weights at full bandwidth), which the route kernel adds up in a fixed order.
    """
    t, d = x.shape
    r = w1.shape[0]
    e = r if w2 is None else w2.shape[0]
    mask = torch.empty((t, e), dtype=torch.bool, device=x.device)
    if t == 0:
        return mask
    interp = _interpreted(x)
    block_t = 16 if t <= 16 else 32 if t <= 32 else 64
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    block_k = 32 if interp else 128
    r_blocks = triton.cdiv(r, block_r)
    t_blocks = triton.cdiv(t, block_t)
    ks = max(1, min(triton.cdiv(d, block_k), (2 * _sms(x)) // max(1, r_blocks * t_blocks), 32))
    k_per = triton.cdiv(triton.cdiv(d, ks), block_k) * block_k
    ks = triton.cdiv(d, k_per)
    part = torch.empty((ks, t, r), dtype=torch.float32, device=x.device)
    _route._router_project_kernel[(r_blocks, ks, t_blocks)](
        x, w1, part, t, d, r,
        x.stride(0), w1.stride(0), part.stride(0), part.stride(1),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, K_PER_SPLIT=k_per,
        IEEE=x.dtype == torch.float32, UPCAST=interp, num_warps=4,
    )
    block_e = triton.next_power_of_2(e)
    low = w2 is not None
    act = -1 if hidden_activation in (None, "none") else _ffn.ACT_IDS[hidden_activation]
    _route._route_kernel[(t,)](
        part, budget, mask, w2 if low else part, b1 if b1 is not None else part,
        b2 if b2 is not None else part,
        t, e, r, min_experts, max_experts,
        part.stride(0), part.stride(1), mask.stride(0), w2.stride(0) if low else 0,
        KS=ks, LOW_RANK=low, HAS_B1=b1 is not None, HAS_B2=low and b2 is not None,
        HIDDEN_ACT=act if low else -1,
        BLOCK_E=block_e, BLOCK_J=min(block_e, 64), BLOCK_R=triton.next_power_of_2(r),
        num_warps=4 if block_e <= 64 else 8,
    )
    return mask


# ------------------------------------------------------------------------- routed_ffn


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """Block sizes and splits of the two FFN phases (see :mod:`prunepath.triton_kernels.ffn`)."""

    block_t: int
    up_block_n: int
    up_block_k: int
    ks: int  # splits of d in the up phase (1 = write activated h)
    down_block_n: int
    down_block_d: int
    s: int  # splits of F in the down phase (1 = write the output directly)
    num_warps: int = 4
    num_stages: int = 3


def default_config(t: int, d: int, f: int, sms: int, interpreted: bool) -> FFNConfig:
    """Shape-only heuristic (no data dependence): fill the GPU in both phases."""
    block_t = 16 if t <= 16 else 32 if t <= 32 else 64
    t_blocks = triton.cdiv(t, block_t)
    if interpreted:  # tiny tiles keep the CPU interpreter fast
        up_n, up_k, dn_n, dn_d = 16, 32, 16, 32
    else:
        up_n = 32 if t <= 16 else 64
        up_k = 128
        dn_n, dn_d = 64, 128 if d >= 2048 else 64
    n_up = triton.cdiv(f, up_n) * t_blocks
    # split d while the up phase has fewer than ~4 programs per SM, only for T <= 2: every
    # down program re-reads the fp32 partial pre-activations (KS*2*T*F*4 bytes per d-tile;
    # measured on an H100, KS=2 at T=16 cost ~9% over dense at full density)
    ks = 1
    if t <= 2:
        while ks < 8 and n_up * ks < 4 * sms and d // (2 * ks) >= up_k:
            ks *= 2
    # split F in the down phase for parallelism, while the fp32 partial sums (S*T*d*4 bytes,
    # written and re-read) stay under ~5% of the weight bytes (6*d*F for bf16)
    n_down = triton.cdiv(d, dn_d) * t_blocks
    s = 1
    while (s < 32 and n_down * s < 4 * sms and f // (2 * s) >= dn_n
           and 2 * s * t <= 0.075 * f):
        s *= 2
    return FFNConfig(block_t, up_n, up_k, ks, dn_n, dn_d, s)


def routed_ffn(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down, config=None, out=None,
               poison=False):
    """``w_down_t`` is W_down^T as an [F, d] view (any strides: a .T view of nn.Linear's
    [d, F] W_down, or a contiguous prepacked copy). Returns [T, d] in x's dtype.

    Testing hooks: ``config`` forces block sizes, ``out`` is written in place, ``poison``
    fills the intermediate buffers with NaN first (a read of an unwritten element shows)."""
    t, d = x.shape
    f = w_up.shape[0]
    e = mask.shape[1]
    if out is None:
        out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    if w_up.stride(1) != 1 or (w_gate is not None and w_gate.stride(1) != 1):
        raise ValueError("w_up/w_gate must have unit stride along d")
    if w_gate is not None and w_gate.stride(0) != w_up.stride(0):
        w_gate = w_gate.contiguous()
        w_up = w_up.contiguous()
    interp = _interpreted(x)
    cfg = config or default_config(t, d, f, _sms(x), interp)
    ieee = x.dtype == torch.float32
    gated = w_gate is not None
    act = _ffn.ACT_IDS[activation]
    t_blocks = triton.cdiv(t, cfg.block_t)
    mask_u8 = mask.view(torch.uint8)
    dummy = x

    # phase 1
    k_per = triton.cdiv(triton.cdiv(d, cfg.ks), cfg.up_block_k) * cfg.up_block_k
    ks = triton.cdiv(d, k_per)
    if ks == 1:
        h = torch.empty((t, f), dtype=x.dtype, device=x.device)
        hs, hg, ht = 0, 0, h.stride(0)
    else:
        g = 2 if gated else 1
        h = torch.empty((ks, g, t, f), dtype=torch.float32, device=x.device)
        hs, hg, ht = h.stride(0), h.stride(1), h.stride(2)
    if poison:
        h.fill_(float("nan"))
    _ffn._ffn_up_kernel[(triton.cdiv(f, cfg.up_block_n), ks, t_blocks)](
        x, w_gate if gated else w_up, w_up, b_up if b_up is not None else dummy, mask_u8, h,
        t, d, f, f // e,
        x.stride(0), w_up.stride(0), mask_u8.stride(0), hs, hg, ht,
        GATED=gated, HAS_BU=b_up is not None, ACT=act, KS=ks, K_PER_SPLIT=k_per, IEEE=ieee,
        UPCAST=interp, TWO_EXPERTS=f // e >= cfg.up_block_n,
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.up_block_n, BLOCK_K=cfg.up_block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    # phase 2
    s = max(1, min(cfg.s, triton.cdiv(f, cfg.down_block_n)))
    if s == 1:
        dst, os_, ot = out, 0, out.stride(0)
    else:
        dst = torch.empty((s, t, d), dtype=torch.float32, device=x.device)
        os_, ot = dst.stride(0), dst.stride(1)
        if poison:
            dst.fill_(float("nan"))
    _ffn._ffn_down_kernel[(triton.cdiv(d, cfg.down_block_d), s, t_blocks)](
        h, w_down_t, b_up if b_up is not None else dummy, b_down if b_down is not None else dummy,
        mask_u8, dst,
        t, d, f, f // e,
        hs, hg, ht, w_down_t.stride(0), w_down_t.stride(1), mask_u8.stride(0), os_, ot,
        GATED=gated, HAS_BU=b_up is not None, HAS_BD=b_down is not None, ACT=act,
        KS=ks, S=s, IEEE=ieee, UPCAST=interp, TWO_EXPERTS=f // e >= cfg.down_block_n,
        N_CONTIGUOUS=w_down_t.stride(0) == 1 and w_down_t.stride(1) != 1,
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.down_block_n, BLOCK_D=cfg.down_block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if s > 1:
        n = t * d
        block = 1024
        _ffn._ffn_reduce_kernel[(triton.cdiv(n, block),)](
            dst, b_down if b_down is not None else dummy, out, n, d, dst.stride(0),
            S=s, HAS_BD=b_down is not None, BLOCK=block, num_warps=4,
        )
    return out
