"""Per-kernel device times (torch.profiler) of routed_ffn per GPU backend.

    python bench/profile_ffn_gpu.py      # d x F = 4096 x 11008, E = 64, bf16
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prunepath import ops  # noqa: E402

torch.manual_seed(0)
d, f, e = 4096, 11008, 64
dt = torch.bfloat16
wg, wu = [(torch.randn(f, d, device="cuda") / 64).to(dt) for _ in range(2)]
wd = (torch.randn(d, f, device="cuda") / 100).to(dt)
for t, sp in ((1, 0.9), (1, 0.5), (16, 0.0)):
    k = round((1 - sp) * e)
    mask = torch.zeros(t, e, dtype=torch.bool, device="cuda")
    mask.scatter_(1, torch.rand(t, e, device="cuda").argsort(-1)[:, :k], True)
    x = torch.randn(t, d, device="cuda").to(dt)
    for b in ("triton", "cuda"):
        for _ in range(3):
            ops.routed_ffn(x, wg, wu, wd, mask, backend=b)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                ops.routed_ffn(x, wg, wu, wd, mask, backend=b)
            torch.cuda.synchronize()
        print(f"=== T={t} sparsity={sp} backend={b}")
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0) > 0:
                tot = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
                if tot > 0:
                    print(f"  {ev.key[:90]:90s} calls={ev.count:3d} avg_us={tot / ev.count:8.2f}")
