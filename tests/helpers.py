"""Shared test utilities: tolerances (as in the device METHOD.md), poisoned buffers, and
loading a bench script as a module."""

from pathlib import Path

import torch

# relative error ||out - ref|| / ||ref||, with the reference in float64
REL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or poisoned elements?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close_rel(out, ref, dtype):
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"relative error {err:.3e} >= {REL_TOL[dtype]:.1e} ({dtype})"


def assert_mask_equal_up_to_rounding(out, ref, logits, budget, mass_eps=1e-4):
    """``out == ref`` except for tokens whose budget lies within ``mass_eps`` of a cumulative
    mass (a fused kernel sums the router projection in another order than torch, so such a
    token's mask may flip); ``logits`` [T, E] are the reference's, ``budget`` [T]."""
    mism = out != ref
    if not mism.any():
        return
    p = torch.softmax(logits.double(), -1)
    sp, _ = p.sort(-1, descending=True)
    gap = (sp.cumsum(-1) - sp - budget.double().cpu().to(p.device)[:, None]).abs().min(-1).values
    near = gap[mism.any(-1)]
    assert (near < mass_eps).all(), (
        f"{int(mism.any(-1).sum())} tokens' masks differ, some far from the budget "
        f"(closest cumulative mass {float(near.max()):.2e} away)")


def bench_module(script: str):
    """``bench/<script>`` imported as ``bench.<name>`` from this checkout's bench package
    (the scripts import ``bench.common``), whatever the current folder."""
    from prunepath.cli import bench_module as load

    return load(Path(script).stem, Path(__file__).resolve().parents[1] / "bench")
