"""GPU micro-benchmark of the routed FFN kernels' in-register list prologue (issue 7).

Every program of both FFN phases builds the step's list of live experts from the mask
(``ffn._union`` over tokens, then ``ffn._live_experts``: cumsum and binary search). This
times that prologue alone, in a kernel that only builds the list and stores it, for a
grid like the FFN phases' (one or four programs per SM), per (T, E, LIST_T): LIST_T is
how many tokens' mask rows one union step loads ([LIST_T, BLOCK_E] bytes).

    python bench/list_prologue_gpu.py --json out/list_prologue.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from prunepath.triton_kernels import ffn as _ffn


@triton.jit
def _union_only(mask_ptr, out_ptr, T, E, stride_mt, LIST_T: tl.constexpr, BLOCK_E: tl.constexpr):
    u = _ffn._union(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E)
    tl.store(out_ptr + tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E), u)


@triton.jit
def _live_list(mask_ptr, out_ptr, T, E, stride_mt, LIST_T: tl.constexpr, BLOCK_E: tl.constexpr,
               LOG2_E: tl.constexpr):
    live_e, n = _ffn._live_experts(mask_ptr, T, E, stride_mt, LIST_T, BLOCK_E, LOG2_E)
    tl.store(out_ptr + tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E), live_e + n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--experts", default="64,448,896")
    ap.add_argument("--list-t", default="0,4,16,64", help="0: the launcher's choice")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"{'T':>3} {'E':>4} {'LIST_T':>6} {'progs':>5} {'union us':>9} {'list us':>8}")
    for t in map(int, args.tokens.split(",")):
        for e in map(int, args.experts.split(",")):
            block_e = triton.next_power_of_2(e)
            mask = torch.rand(t, e, device="cuda") < 0.5
            mask_u8 = mask.view(torch.uint8)
            for lt in map(int, args.list_t.split(",")):
                list_t = lt or max(1, min(triton.next_power_of_2(t), 4096 // block_e))
                if lt and lt > triton.next_power_of_2(t):
                    continue
                for progs in (sms, 4 * sms):
                    out = torch.empty(progs, block_e, dtype=torch.int32, device="cuda")
                    args_ = (mask_u8, out, t, e, mask_u8.stride(0))
                    us_u = 1e3 * do_bench_cudagraph(lambda: _union_only[(progs,)](
                        *args_, LIST_T=list_t, BLOCK_E=block_e), return_mode="median")
                    us_l = 1e3 * do_bench_cudagraph(lambda: _live_list[(progs,)](
                        *args_, LIST_T=list_t, BLOCK_E=block_e,
                        LOG2_E=block_e.bit_length() - 1), return_mode="median")
                    rows.append({"T": t, "E": e, "list_t": list_t, "launcher_list_t": lt == 0,
                                 "programs": progs, "union_us": us_u, "list_us": us_l})
                    print(f"{t:>3} {e:>4} {list_t:>6}{'*' if lt == 0 else ' '} {progs:>5} "
                          f"{us_u:>9.1f} {us_l:>8.1f}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
