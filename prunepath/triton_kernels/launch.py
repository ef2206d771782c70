"""Host-side launchers for the Triton kernels: block-size heuristics, buffers, grids.

Everything here depends only on shapes and dtypes (never on tensor contents), so the
launches are safe inside CUDA graphs and behind torch.compile's custom-op boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from . import ffn as _ffn
from . import route as _route


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _pdl_capability(index: int) -> bool:
    """Programmatic dependent launch needs sm_90+; PRUNEPATH_TRITON_PDL=0 turns it off."""
    if os.environ.get("PRUNEPATH_TRITON_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl_supported(t: torch.Tensor) -> bool:
    return _pdl_capability(t.device.index if t.device.index is not None
                           else torch.cuda.current_device())


def _sms(t: torch.Tensor) -> int:
    if _interpreted(t):
        return 4
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------ route


def _route_block_j(block_e: int) -> int:
    """Experts compared per chunk in the route kernel's rank computation: up to 128 experts in
    one chunk (the probabilities are then used as they are, not picked out of the register
    vector chunk by chunk). H100, E = 128, T = 1, graph: fused router_route 9.0 -> 7.5 us
    (linear router), 7.6 -> 6.55 us (low rank); route from logits and E = 64 unchanged."""
    return min(block_e, 128)


def route(logits: torch.Tensor, budget: torch.Tensor, min_experts: int, max_experts: int):
    """Bool mask [T, E] (see :mod:`prunepath.triton_kernels.route`)."""
    t, e = logits.shape
    mask = torch.empty((t, e), dtype=torch.bool, device=logits.device)
    if t == 0:
        return mask
    block_e = triton.next_power_of_2(e)
    _route._route_kernel[(t,)](
        logits, budget, mask, logits, logits, logits, mask,
        t, e, e, min_experts, max_experts,
        0, logits.stride(0), mask.stride(0), 0, budget.stride(0),
        KS=1, LOW_RANK=False, HAS_B1=False, HAS_B2=False, HIDDEN_ACT=-1,
        BLOCK_E=block_e, BLOCK_J=_route_block_j(block_e), BLOCK_R=1,
        num_warps=4 if block_e <= 64 else 8,
    )
    return mask


def _router_project(x, w1, pdl):
    """The router projection's ``ks`` fp32 partial sums ``[ks, T, R]`` of ``x @ w1^T``, split
    over d (enough programs to read W1 at full bandwidth). Returns ``(partials, ks)``."""
    t, d = x.shape
    r = w1.shape[0]
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
        IEEE=x.dtype == torch.float32, UPCAST=interp, PDL=pdl, num_warps=4,
    )
    return part, ks


def router_route(x, w1, b1, w2, b2, hidden_activation, budget, min_experts, max_experts):
    """Fused router + routing: logits = ``x @ w1^T + b1`` (linear router, w1 [E, d]) or
    ``act(x @ w1^T + b1) @ w2^T + b2`` (low-rank router, w1 [R, d], w2 [E, R]) -> mask [T, E].

    The projection is split over ``d`` into KS partial sums (enough programs to read the
    router weights at full bandwidth), which the route kernel adds up (a fixed reduction:
    deterministic); on sm_90+ the route kernel is a programmatic dependent launch (its
    prologue overlaps the projection). Returns ``(mask, budget_ok)``: ``budget_ok`` (bool, 0-dim) says whether
    every budget lies in [0, 1] (NaN is not).
    """
    t, d = x.shape
    r = w1.shape[0]
    e = r if w2 is None else w2.shape[0]
    mask = torch.empty((t, e), dtype=torch.bool, device=x.device)
    ok = torch.empty((), dtype=torch.bool, device=x.device)
    if t == 0:
        return mask, ok.fill_(True)
    interp = _interpreted(x)
    pdl = not interp and _pdl_supported(x)
    part, ks = _router_project(x, w1, pdl)
    block_e = triton.next_power_of_2(e)
    low = w2 is not None
    act = -1 if hidden_activation in (None, "none") else _ffn.ACT_IDS[hidden_activation]
    launch_pdl = {} if interp else {"launch_pdl": pdl}
    if low and block_e > 128:
        # many experts: the second layer in its own kernel, many programs (the route
        # kernel's one program per token was latency bound there), then route the logits
        logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
        block_eo = 64
        _route._router_out_kernel[(triton.cdiv(e, block_eo), t)](
            part, w2, b1 if b1 is not None else part, b2 if b2 is not None else part, logits,
            t, e, r, part.stride(0), part.stride(1), w2.stride(0), logits.stride(0),
            KS=ks, HAS_B1=b1 is not None, HAS_B2=b2 is not None, HIDDEN_ACT=act,
            BLOCK_EO=block_eo, BLOCK_R=triton.next_power_of_2(r),
            KS_P2=triton.next_power_of_2(ks), PDL=pdl, num_warps=4, **launch_pdl,
        )
        part, ks, low, b1, r = logits[None], 1, False, None, e
    _route._route_kernel[(t,)](
        part, budget, mask, w2 if low else part, b1 if b1 is not None else part,
        b2 if low and b2 is not None else part, ok,
        t, e, r, min_experts, max_experts,
        part.stride(0), part.stride(1), mask.stride(0), w2.stride(0) if low else 0,
        budget.stride(0),
        KS=ks, LOW_RANK=low, HAS_B1=b1 is not None, HAS_B2=low and b2 is not None,
        HIDDEN_ACT=act if low else -1,
        BLOCK_E=block_e, BLOCK_J=_route_block_j(block_e), BLOCK_R=triton.next_power_of_2(r),
        PDL=pdl, CHECK=True, BLOCK_B=64, KS_P2=triton.next_power_of_2(ks),
        num_warps=4 if block_e <= 64 else 8, **launch_pdl,
    )
    return mask, ok


# ------------------------------------------------------------------------- routed_ffn


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """Block sizes and splits of the two FFN phases (see :mod:`prunepath.triton_kernels.ffn`)."""

    block_t: int
    up_block_n: int
    up_block_k: int
    ks: int  # most splits of d in the up phase (1 = write activated h); the step uses <= ks
    down_block_n: int
    down_block_d: int
    s: int  # splits of F in the down phase (1 = write the output directly)
    num_warps: int = 4
    num_stages: int = 3
    up_programs: int = 0  # programs of the up phase per token block (0: 4 per SM)
    # the step's d-split aims at up_fill work items per SM (0.75: one split, the pipelined
    # down path, down to ~25% live experts at 4096 x 11008; measured faster at 30% on an H100)
    up_fill: float = 1.0
    # the down kernel sums the S partials itself (last program of each d-slab; a reduction
    # fixed at compile time) instead of a reduce launch
    fold_reduce: bool = True
    # launch the down kernel as a programmatic dependent of the up kernel (CUDA, sm_90+):
    # its launch and live list overlap the up phase; it waits before reading h
    pdl: bool = True
    # the compacted live-neuron list instead of aligned chunks (see ffn.py): None = when the
    # experts are smaller than a chunk of either phase (a chunk then mixes live and dead
    # experts, and whole chunks were streamed)
    compact: bool | None = None


def use_compact(cfg: FFNConfig, neurons_per_expert: int) -> bool:
    """Whether the kernels run on the compacted live-neuron list for this config."""
    if cfg.compact is not None:
        return cfg.compact
    return neurons_per_expert < max(cfg.up_block_n, cfg.down_block_n)


def default_config(t: int, d: int, f: int, sms: int, interpreted: bool,
                   neurons_per_expert: int | None = None, linear_down: bool = False,
                   elem_bytes: int = 2) -> FFNConfig:
    """Shape-only heuristic (no data dependence): fill the GPU in both phases.

    ``neurons_per_expert``: the experts' size (small experts run on the compacted list);
    ``linear_down``: W_down comes in nn.Linear's [d, F] layout (else a packed W_down^T);
    ``elem_bytes``: the weights' element size (fp32 tiles need twice the shared memory)."""
    block_t = 16 if t <= 16 else 32 if t <= 32 else 64
    t_blocks = triton.cdiv(t, block_t)
    compact_list = neurons_per_expert is not None and neurons_per_expert < 64
    if interpreted:  # tiny tiles keep the CPU interpreter fast
        up_n, up_k, dn_n, dn_d = 16, 32, 16, 32
    else:
        # 32-neuron up tiles at T <= 16 keep a chunk's dead neurons few; on the compacted
        # list (experts < 64 neurons) every tile is live, and at T >= 3 64-neuron tiles were
        # faster (H200, 4096 x 14336, T = 4, 32- and 16-neuron experts: -3 to -5 us of
        # ~105 us); at T = 1 they were not (0.7 sparsity: +9 to +17 us)
        # More tokens, chunk mode: 32 too (H200, T = 64, E = 128: 116 -> 108 us at 4096 x
        # 11008, 139 -> 130 us at 4096 x 14336; E = 64 within 1 us; the H100 saw no change)
        up_n = 64 if compact_list and t > 2 else 32
        # T <= 2: 256-wide d-tiles put twice the weight bytes in flight per program (H100,
        # 4096 x 11008, T = 1 sweep: 0.7 sparsity 41.2 -> 38.4 us, dense 101.7 -> 100.4 us,
        # 0.5 and 0.9 within 0.3 us); more tokens keep 128 (their tiles are taller already)
        up_k = 256 if t <= 2 and d >= 2048 else 128
        dn_n, dn_d = 64, 128 if d >= 2048 else 64
        if compact_list and t > 2 and d >= 2048 and elem_bytes <= 2:
            # compacted list, T >= 3: 256-wide output slabs (H200, 4096 x 14336, 16- and
            # 32-neuron experts, T = 4 / 16 / 64: -1 to -30 us; chunk mode, E = 64: no gain;
            # fp32 tiles of that width need 240 KB of shared memory, more than an SM has)
            dn_d = 256
    # up to 8 splits of d for T <= 2: each step uses the fewest that give every SM a work item
    # (1 at full density, 4 with 10% of the experts live; measured on an H100, 4096 x 11008).
    # Not for more tokens: every down program re-reads the fp32 partial pre-activations
    # (KS*2*T*F*4 bytes per d-tile; KS=2 at T=16 cost ~9% over dense at full density)
    ks = 1
    if t <= 2:
        while ks < 8 and d // (2 * ks) >= up_k:
            ks *= 2
    # split F in the down phase for parallelism, while the fp32 partial sums (S*T*d*4 bytes,
    # written and re-read) stay small: at most 16 splits for T <= 2 (H100 sweep, 4096 x 11008,
    # T = 1: 16 beat 8 and 32 by 1-3 us), 8 above (T = 4 and 16 were fastest with 8)
    n_down = triton.cdiv(d, dn_d) * t_blocks
    s_max = 16 if t <= 2 else 8
    s = 1
    while (s < s_max and n_down * s < 4 * sms and f // (2 * s) >= dn_n
           and 2 * s * t <= 0.075 * f):
        s *= 2
    # T <= 2: the down kernel sums its split partials itself and is a programmatic dependent
    # launch of the up kernel (H100, 4096 x 11008, T = 1: -0.7 to -2.4 us a step). More tokens
    # keep the reduce launch and plain launches (no gain measured at T = 4..64).
    # On the compacted list PDL pays at T >= 3 too (H200, 4096 x 14336, with 256-wide slabs,
    # T = 4 / 16: -1 to -5 us), except with 16-neuron experts in nn.Linear's W_down (T = 4:
    # +15 us); in chunk mode it does not (E = 64, T = 4 / 16: +8 to +14 us)
    one = t <= 2
    compact_pdl = (not interpreted and compact_list
                   and not (linear_down and neurons_per_expert < 32))
    # 64-token up tiles take 147 KB of shared memory, one program per SM: on the compacted
    # list, programs past the first round pay the list prologue again (H200, 4096 x 14336,
    # T = 64, E = 448 / 896: 170 -> 149 us, 235 -> 190 us with one program per SM; E = 64,
    # chunk mode: 111.4 vs 112.2 us, left as it was)
    per_sm = 1 if compact_list and block_t == 64 else 4
    # T <= 2 with a packed W_down^T: the compacted list for large experts too. Its per-item
    # lookup is one gather from the E-entry expert list where the chunk list reduces over all
    # F / 32 chunks (H200, 4096 x 14336, E = 64, T = 1: 52.7 -> 51.3 us at 0.5 sparsity,
    # 33.1 -> 32.6 at 0.75, 91.5 -> 90.7 at 0; repeats of the default varied by 0.2 us). Not
    # with nn.Linear's W_down: a compacted tile of experts whose size is not a power of two
    # loses its vectorized loads along F there.
    compact = True if one and not linear_down else None
    return FFNConfig(block_t, up_n, up_k, ks, dn_n, dn_d, s, up_programs=per_sm * sms // t_blocks,
                     up_fill=0.75, fold_reduce=one, pdl=one or compact_pdl, compact=compact)


def _list_blocks(t: int, e: int, f: int, block_n: int):
    """Tile sizes of the in-kernel live-chunk list: (tokens per union step, E block, chunks).

    Few wide union steps: each step of the token loop cost ~2.5 us per program on the H200
    whatever its width (bench/list_prologue_gpu.py, T = 64, E = 896, 132 programs: 4-token
    steps 40.6 us, 16-token steps 12.0 us, one 64-token step 4.8 us); 16K mask bytes a step
    keep the FFN kernels free of spills (64K spilled 1.6-2 KB at E = 896, T = 64)."""
    block_e = triton.next_power_of_2(e)
    list_t = max(1, min(triton.next_power_of_2(t), 16384 // block_e))
    return list_t, block_e, triton.next_power_of_2(triton.cdiv(f, block_n))


def _up_weights(w_gate, w_up):
    """(w_gate, w_up) as the up kernels index them: unit stride along d (else ValueError) and
    one row stride for both (copied contiguous if they differ)."""
    if w_up.stride(1) != 1 or (w_gate is not None and w_gate.stride(1) != 1):
        raise ValueError("w_up/w_gate must have unit stride along d")
    if w_gate is not None and w_gate.stride(0) != w_up.stride(0):
        return w_gate.contiguous(), w_up.contiguous()
    return w_gate, w_up


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
    w_gate, w_up = _up_weights(w_gate, w_up)
    interp = _interpreted(x)
    n_contiguous = w_down_t.stride(0) == 1 and w_down_t.stride(1) != 1
    cfg = config or default_config(t, d, f, _sms(x), interp, f // e, linear_down=n_contiguous,
                                   elem_bytes=w_up.element_size())
    return _two_phase(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down, cfg, out,
                      poison, n_contiguous)


def _two_phase(x, w_gate, w_up, w_down_t, mask, activation, b_up, b_down, cfg, out, poison,
               n_contiguous):
    """The up and down kernels (plus the reduce without fold)."""
    t, d = x.shape
    f = w_up.shape[0]
    e = mask.shape[1]
    interp = _interpreted(x)
    ieee = x.dtype == torch.float32
    gated = w_gate is not None
    act = _ffn.ACT_IDS[activation]
    t_blocks = triton.cdiv(t, cfg.block_t)
    mask_u8 = mask.view(torch.uint8)
    dummy = x
    ne = f // e
    ks_max = max(1, min(cfg.ks, triton.cdiv(d, cfg.up_block_k)))
    up_items = max(1, int(_sms(x) * cfg.up_fill))
    up_programs = cfg.up_programs or 4 * _sms(x) // t_blocks
    up_programs = max(1, min(up_programs, triton.cdiv(f, cfg.up_block_n) * ks_max))

    # phase 1
    # h activated [T, F] in x's dtype; with ks_max > 1 also fp32 partial pre-activations,
    # used by the steps whose union is sparse enough to split d (the kernels choose)
    h_act = torch.empty((t, f), dtype=x.dtype, device=x.device)
    if ks_max == 1:
        h = h_act
        hs, hg, ht = 0, 0, h.stride(0)
    else:
        g = 2 if gated else 1
        h = torch.empty((ks_max, g, t, f), dtype=torch.float32, device=x.device)
        hs, hg, ht = h.stride(0), h.stride(1), h.stride(2)
    if poison:
        h.fill_(float("nan"))
        h_act.fill_(float("nan"))
    list_t, block_e, up_block_c = _list_blocks(t, e, f, cfg.up_block_n)
    # phase 2's split of F; with fold_reduce its per-slab arrival counters (zeroed by phase 1)
    s = max(1, min(cfg.s, triton.cdiv(f, cfg.down_block_n)))
    d_slabs = triton.cdiv(d, cfg.down_block_d)
    fold = s > 1 and cfg.fold_reduce
    n_cnt = d_slabs * t_blocks if fold else 0
    cnt = torch.empty((max(n_cnt, 1),), dtype=torch.int32, device=x.device)
    pdl = cfg.pdl and not interp and _pdl_supported(x)
    compact = use_compact(cfg, ne)
    log2_e = block_e.bit_length() - 1
    # nn.Linear's W_down in compact mode: whole power-of-two experts keep vectorized loads
    ne_vec = (ne if compact and n_contiguous and ne & (ne - 1) == 0
              and cfg.down_block_n % ne == 0 else 0)
    _ffn._ffn_up_kernel[(up_programs, t_blocks)](
        x, w_gate if gated else w_up, w_up, b_up if b_up is not None else dummy, mask_u8, h,
        h_act, cnt, t, d, f, ne, e, up_items, n_cnt,
        x.stride(0), w_up.stride(0), mask_u8.stride(0), hs, hg, ht, h_act.stride(0),
        GATED=gated, HAS_BU=b_up is not None, ACT=act, KS=ks_max, IEEE=ieee,
        UPCAST=interp, TWO_EXPERTS=ne >= cfg.up_block_n,
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.up_block_n, BLOCK_K=cfg.up_block_k,
        LIST_T=list_t, BLOCK_E=block_e, BLOCK_C=up_block_c,
        PDL=pdl,
        BLOCK_CNT=triton.next_power_of_2(n_cnt) if n_cnt else 0,
        COMPACT=compact, LOG2_E=log2_e,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    # phase 2
    if s == 1:
        dst, os_, ot = out, 0, out.stride(0)
    else:
        dst = torch.empty((s, t, d), dtype=torch.float32, device=x.device)
        os_, ot = dst.stride(0), dst.stride(1)
        if poison:
            dst.fill_(float("nan"))
    _, _, down_block_c = _list_blocks(t, e, f, cfg.down_block_n)
    down_extra = {} if interp else {"launch_pdl": pdl}
    _ffn._ffn_down_kernel[(d_slabs, s, t_blocks)](
        h, h_act, w_down_t, b_up if b_up is not None else dummy,
        b_down if b_down is not None else dummy, mask_u8, dst, cnt, out,
        t, d, f, ne, e, up_items,
        hs, hg, ht, h_act.stride(0), w_down_t.stride(0), w_down_t.stride(1), mask_u8.stride(0),
        os_, ot, out.stride(0),
        GATED=gated, HAS_BU=b_up is not None, HAS_BD=b_down is not None, ACT=act,
        KS=ks_max, S=s, IEEE=ieee, UPCAST=interp, TWO_EXPERTS=ne >= cfg.down_block_n,
        N_CONTIGUOUS=n_contiguous,
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.down_block_n, BLOCK_D=cfg.down_block_d,
        UP_BLOCK_N=cfg.up_block_n, UP_BLOCK_K=cfg.up_block_k,
        LIST_T=list_t, BLOCK_E=block_e, BLOCK_C=down_block_c,
        PDL=pdl, FOLD=fold, S_P2=triton.next_power_of_2(s),
        COMPACT=compact, LOG2_E=log2_e, NE_VEC=ne_vec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **down_extra,
    )
    if s > 1 and not fold:
        n = t * d
        # enough programs to read the S partials in parallel (4096 outputs: 32 programs)
        block = max(128, min(1024, triton.next_power_of_2(triton.cdiv(n, 32))))
        _ffn._ffn_reduce_kernel[(triton.cdiv(n, block),)](
            dst, b_down if b_down is not None else dummy, out, n, d, dst.stride(0),
            S=s, HAS_BD=b_down is not None, BLOCK=block, num_warps=4,
        )
    return out


def live_chunks_reference(mask: torch.Tensor, f: int, block_n: int):
    """Plain-torch semantics of the kernels' live-chunk list: the ascending (lo, hi) neuron
    ranges of the live ``block_n``-chunks for the union over tokens of ``mask`` [T, E].
    With experts of >= block_n neurons, [lo, hi) is exactly the chunk's live neurons (they
    are contiguous), else the whole chunk."""
    e = mask.shape[1]
    ne = f // e
    neuron_live = mask.any(0).cpu().repeat_interleave(ne)
    ranges = []
    for start in range(0, f, block_n):
        end = min(start + block_n, f)
        idx = torch.nonzero(neuron_live[start:end]).flatten()
        if idx.numel() == 0:
            continue
        if ne >= block_n:
            ranges.append((start + int(idx[0]), start + int(idx[-1]) + 1))
        else:
            ranges.append((start, end))
    return ranges


def live_chunks(mask: torch.Tensor, d: int, f: int, block_n: int, block_k: int = 128,
                up_items: int = 1, ks_max: int = 1):
    """What the FFN kernels compute for themselves, written out by a one-program kernel (a
    testing aid; syncs with the host): ``{"chunks": [(lo, hi), ...], "ks": splits of d,
    "k_blocks_per_split": int}`` for chunks of ``block_n`` neurons."""
    t, e = mask.shape
    list_t, block_e, block_c = _list_blocks(t, e, f, block_n)
    out = torch.full((3 + 2 * block_c,), -7, dtype=torch.int32, device=mask.device)
    mask_u8 = mask.view(torch.uint8)
    _ffn._live_chunks_kernel[(1,)](
        mask_u8, out, t, e, f, f // e, d, mask_u8.stride(0), up_items,
        KS_MAX=ks_max, BLOCK_K=block_k, BN=block_n, TWO_EXPERTS=f // e >= block_n,
        LIST_T=list_t, BLOCK_E=block_e, BLOCK_C=block_c, num_warps=4,
    )
    out = out.cpu().tolist()
    n = out[0]
    return {"chunks": [(out[3 + 2 * i], out[4 + 2 * i]) for i in range(n)], "ks": out[1],
            "k_blocks_per_split": out[2]}
