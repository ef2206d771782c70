"""Shared test utilities: tolerances (as in the device METHOD.md) and poisoned buffers."""

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
