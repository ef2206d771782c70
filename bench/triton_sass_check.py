"""Compile the Triton kernels for Hopper (sm_90) WITHOUT a GPU and inspect the machine code.

For the kernels ``prunepath.triton_kernels.launch`` would launch on the benchmark shapes
(bench.ops_gpu), this prints registers, local memory (spills), shared memory and the
load/matrix instructions in the SASS: weight tiles should use 16-byte loads
(``LDGSTS.E.BYPASS.128`` = cp.async 16 B, or ``LDG.E.128``), never 2-byte ``LDG.E.U16``;
16-token tiles use ``HMMA``, 64-token tiles ``HGMMA`` (wgmma). Uses Triton's bundled
``ptxas``/``cuobjdump``; relies on Triton's compiler API (tested with Triton 3.9).

    python -m bench.triton_sass_check

It also reports the masked-dense path's routed activation kernel (E = 64 .. 448) and the
route kernel's registers and spills for E = 64 .. 896 (the sorting tail above 128
experts), and checks the compacted small-expert FFN (E = 448 and 896 on 4096 x 14336, both
W_down layouts).

Unlike the other scripts here, this one works below the public ops API by design: it
compiles the ``@triton.jit`` kernel functions of ``prunepath.triton_kernels`` themselves
with the launcher's block choices, so it names them (``ffn._ffn_up_kernel``, ...) and must
follow them when they change.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")
COUNT = ("LDGSTS.E.BYPASS.128", "LDG.E.128", "LDG.E.64", "LDG.E.U16", "HMMA", "HGMMA")
# the kernel modules by their full names (prunepath.triton_kernels.route / .masked_act are
# also the names of its launcher functions)
ffn, launch, masked_act_kernels, route_kernels = (
    importlib.import_module(f"prunepath.triton_kernels.{m}")
    for m in ("ffn", "launch", "masked_act", "route"))


def compile_for_sm90(fn, sig, constexprs, div16=(), num_warps=4, num_stages=3):
    """Compile ``fn`` with argument types ``sig``; ints equal to 1 and ``constexprs`` become
    constants, ``div16`` args get the divisibility-by-16 hint (as the runtime would)."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else sig[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    opts = make_backend(TARGET).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=TARGET, options=opts.__dict__)


def inspect(ck) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(ck.asm["cubin"])
        fh.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", fh.name], capture_output=True, text=True).stdout
        res = subprocess.run([CUOBJDUMP, "-res-usage", fh.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    out = dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()))) if m else {}
    out["smem_dyn"] = ck.metadata.shared
    out.update({k: len(re.findall(re.escape(k) + r"\b", sass)) for k in COUNT})
    return out


def ffn_kernels(t, d, f, e, dtype="bf16", packed=True):
    """(config, ks, s, compiled up kernel, compiled down kernel) for the launcher's default
    config (with PDL, and the folded reduce when s > 1)."""
    ne = f // e
    cfg = launch.default_config(t, d, f, 132, False, ne, linear_down=not packed)
    ks = max(1, min(cfg.ks, triton.cdiv(d, cfg.up_block_k)))
    h_ty = "fp32" if ks > 1 else dtype
    list_t, block_e, up_c = launch._list_blocks(t, e, f, cfg.up_block_n)
    compact = launch.use_compact(cfg, ne)
    log2_e = block_e.bit_length() - 1
    ne_vec = (ne if compact and not packed and ne & (ne - 1) == 0 and cfg.down_block_n % ne == 0
              else 0)
    _, _, dn_c = launch._list_blocks(t, e, f, cfg.down_block_n)
    up = compile_for_sm90(
        ffn._ffn_up_kernel,
        dict(x_ptr=f"*{dtype}", wg_ptr=f"*{dtype}", wu_ptr=f"*{dtype}", bu_ptr=f"*{dtype}",
             mask_ptr="*u8", out_ptr=f"*{h_ty}", hact_ptr=f"*{dtype}", cnt_ptr="*i32",
             T="i32", D="i32", F="i32", NE="i32", E="i32", up_items="i32", n_cnt="i32",
             stride_xt="i32", stride_wn="i32", stride_mt="i32", stride_os="i32",
             stride_og="i32", stride_ot="i32", stride_at="i32"),
        dict(GATED=True, HAS_BU=False, ACT=0, KS=ks, IEEE=dtype == "fp32",
             UPCAST=False, TWO_EXPERTS=ne >= cfg.up_block_n, BLOCK_T=cfg.block_t,
             BLOCK_N=cfg.up_block_n, BLOCK_K=cfg.up_block_k, LIST_T=list_t, BLOCK_E=block_e,
             BLOCK_C=up_c, PDL=True, BLOCK_CNT=32, COMPACT=compact, LOG2_E=log2_e),
        div16=("x_ptr", "wg_ptr", "wu_ptr", "out_ptr", "hact_ptr", "mask_ptr", "D", "F",
               "stride_xt", "stride_wn", "stride_os", "stride_og", "stride_ot", "stride_at"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    s = max(1, min(cfg.s, triton.cdiv(f, cfg.down_block_n)))
    consts = dict(GATED=True, HAS_BU=False, HAS_BD=False, ACT=0, KS=ks, S=s,
                  IEEE=dtype == "fp32", UPCAST=False, TWO_EXPERTS=ne >= cfg.down_block_n,
                  N_CONTIGUOUS=not packed, BLOCK_T=cfg.block_t, BLOCK_N=cfg.down_block_n,
                  BLOCK_D=cfg.down_block_d, UP_BLOCK_N=cfg.up_block_n,
                  UP_BLOCK_K=cfg.up_block_k, LIST_T=list_t, BLOCK_E=block_e, BLOCK_C=dn_c,
                  PDL=True, FOLD=s > 1 and cfg.fold_reduce, S_P2=triton.next_power_of_2(s),
                  COMPACT=compact, LOG2_E=log2_e, NE_VEC=ne_vec)
    consts["stride_wd" if packed else "stride_wn"] = 1  # the runtime specializes 1s
    down = compile_for_sm90(
        ffn._ffn_down_kernel,
        dict(h_ptr=f"*{h_ty}", hact_ptr=f"*{dtype}", wd_ptr=f"*{dtype}", bu_ptr=f"*{dtype}",
             bd_ptr=f"*{dtype}", mask_ptr="*u8", out_ptr="*fp32" if s > 1 else f"*{dtype}",
             cnt_ptr="*i32", fin_ptr=f"*{dtype}",
             T="i32", D="i32", F="i32", NE="i32", E="i32", up_items="i32",
             stride_hs="i32", stride_hg="i32", stride_ht="i32", stride_at="i32",
             stride_wn="i32", stride_wd="i32", stride_mt="i32", stride_os="i32",
             stride_ot="i32", stride_ft="i32"),
        consts,
        div16=("h_ptr", "hact_ptr", "wd_ptr", "out_ptr", "mask_ptr", "D", "F", "stride_hs",
               "stride_hg", "stride_ht", "stride_at", "stride_os", "stride_ot",
               "stride_wd" if not packed else "stride_wn"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cfg, ks, s, up, down


def route_kernel(e, low_rank, rank=64, ks=2):
    """The route kernel as ``launch.route`` (logits) or ``launch.router_route`` with a
    low-rank router (``ks`` projection partials) would launch it for ``e`` experts."""
    block_e = triton.next_power_of_2(e)
    sig = {n: "i32" for n in route_kernels._route_kernel.arg_names}
    sig.update({n: "*fp32" for n in ("z_ptr", "budget_ptr", "w2_ptr", "b1_ptr", "b2_ptr")})
    sig.update({"mask_ptr": "*i1", "ok_ptr": "*i1"})
    consts = dict(KS=ks if low_rank else 1, LOW_RANK=low_rank, HAS_B1=low_rank, HAS_B2=low_rank,
                  HIDDEN_ACT=1 if low_rank else -1, BLOCK_E=block_e,
                  BLOCK_J=launch._route_block_j(block_e), BLOCK_R=rank if low_rank else 1,
                  PDL=low_rank, CHECK=low_rank, BLOCK_B=64,
                  KS_P2=triton.next_power_of_2(ks) if low_rank else 1)
    if low_rank and block_e > 128:  # the launcher: logits from _router_out_kernel first
        consts.update(KS=1, LOW_RANK=False, HAS_B1=False, HAS_B2=False, HIDDEN_ACT=-1,
                      BLOCK_R=1, KS_P2=1)
    return compile_for_sm90(route_kernels._route_kernel, sig, consts, num_warps=4 if block_e <= 64 else 8)


def router_out_kernel(rank=64, ks=2):
    """The low-rank router's second layer above 128 experts, as ``launch.router_route``
    launches it."""
    sig = {n: "i32" for n in route_kernels._router_out_kernel.arg_names}
    sig.update({n: "*fp32" for n in ("z_ptr", "w2_ptr", "b1_ptr", "b2_ptr", "out_ptr")})
    consts = dict(KS=ks, HAS_B1=True, HAS_B2=True, HIDDEN_ACT=1, BLOCK_EO=64, BLOCK_R=rank,
                  KS_P2=triton.next_power_of_2(ks), PDL=True)
    return compile_for_sm90(route_kernels._router_out_kernel, sig, consts, num_warps=4)


def routed_act_kernel(e, low_rank, f=14336, rank=64):
    """The masked-dense path's routed activation kernel as ``masked_act.routed_act`` launches
    it for ``e`` experts on an FFN ``f`` wide (bf16 g/u/z/h, fp32 router tensors)."""
    ma = masked_act_kernels
    epb, block_n = ma._routed_act_blocks(e, f // e)
    block_e = triton.next_power_of_2(e)
    sig = {n: "i32" for n in ma._routed_act_kernel.arg_names}
    sig.update({n: "*bf16" for n in ("g_ptr", "u_ptr", "z_ptr", "h_ptr")})
    sig.update({n: "*fp32" for n in ("b1_ptr", "w2_ptr", "b2_ptr", "budget_ptr")})
    sig["mask_ptr"] = "*u8"
    consts = dict(GATED=True, ACT=0, LOW_RANK=low_rank, HAS_B1=True, HAS_B2=low_rank,
                  HIDDEN_ACT=1 if low_rank else -1, BLOCK_E=block_e, BLOCK_J=min(block_e, 128),
                  BLOCK_R=rank if low_rank else block_e, EPB=epb, BLOCK_N=block_n,
                  ONE_CHUNK=f // e <= block_n)
    return compile_for_sm90(ma._routed_act_kernel, sig, consts, num_warps=8)


def main():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(f"{'routed activation kernel (F = 14336)':44} {'reg':>4} {'stack':>5} {'local':>5}")
    for e, low in ((64, True), (64, False), (128, True), (448, False)):
        r = inspect(routed_act_kernel(e, low))
        flag = "" if r["local"] == 0 and r["stack"] == 0 else "  <-- spills"
        print(f"{'E=' + str(e) + (' low-rank router' if low else ' linear router'):44} "
              f"{r['reg']:>4} {r['stack']:>5} {r['local']:>5}{flag}")
    print()
    print(f"{'route kernel':44} {'reg':>4} {'stack':>5} {'local':>5}")
    for e in (64, 128, 448, 896):
        for low in (False, True):
            r = inspect(route_kernel(e, low))
            flag = "" if r["local"] == 0 and r["stack"] == 0 else "  <-- spills"
            print(f"{'E=' + str(e) + ((' low-rank: route' if e > 128 else ' low-rank router') if low else ' from logits'):44} "
                  f"{r['reg']:>4} {r['stack']:>5} {r['local']:>5}{flag}")
    r = inspect(router_out_kernel())
    flag = "" if r["local"] == 0 and r["stack"] == 0 else "  <-- spills"
    print(f"{'E>128 low-rank second layer (_router_out)':44} {r['reg']:>4} {r['stack']:>5} "
          f"{r['local']:>5}{flag}")
    print()
    print(f"{'case':44} {'kernel':5} {'reg':>4} {'local':>5} {'smem':>6} "
          + " ".join(f"{k:>19}" for k in COUNT))
    bad = 0
    for (d, f, es) in ((4096, 11008, (64, 128)), (4096, 14336, (64, 128, 448, 896)),
                       (8192, 28672, (64, 128))):
        for e in es:
            for t in (1, 4, 16, 64):
                for packed in (True, False):
                    cfg, ks, s, up, down = ffn_kernels(t, d, f, e, packed=packed)
                    name = (f"{d}x{f} E={e} T={t} {'packed' if packed else 'linear'} ks={ks} s={s}"
                            + (" cmp" if launch.use_compact(cfg, f // e) else ""))
                    for kname, ck in (("up", up), ("down", down)):
                        r = inspect(ck)
                        wide = r["LDGSTS.E.BYPASS.128"] + r["LDG.E.128"]
                        ok = r["local"] == 0 and r["LDG.E.U16"] == 0 and wide
                        flag = "" if ok else "  <-- check"
                        bad += bool(flag)
                        print(f"{name:44} {kname:5} {r['reg']:>4} {r['local']:>5} "
                              f"{r['smem_dyn']:>6} " + " ".join(f"{r[k]:>19}" for k in COUNT)
                              + flag)
                    if (d, f, e) not in ((4096, 11008, 64), (4096, 14336, 448),
                                         (4096, 14336, 896)):
                        break  # both layouts once; one layout for the other shapes
    print(f"\n{bad} kernels flagged")


if __name__ == "__main__":
    main()
