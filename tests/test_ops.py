"""Every backend of route / routed_ffn against the plain PyTorch reference.

Backends that are not built here are skipped, unless PRUNEPATH_REQUIRE_BACKENDS names them
(default "cpu,triton": the README install builds both, so a missing one fails
instead of silently skipping; set it to "" to allow skips).
"""

import os

import pytest
import torch

from prunepath import ops
from prunepath.ops.reference import route_reference, routed_ffn_reference

from .helpers import assert_close_rel, assert_mask_equal_up_to_rounding

REQUIRED = [b for b in os.environ.get("PRUNEPATH_REQUIRE_BACKENDS", "cpu,triton").split(",") if b]
CPU_BACKENDS = ["torch", "cpu", "triton"]


def backend_or_skip(name):
    if name not in ops.available_backends("cpu"):
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required (PRUNEPATH_REQUIRE_BACKENDS) but unavailable")
        pytest.skip(f"backend {name!r} not available on this machine")
    return name


def budgets_for(kind, t, gen):
    if kind == "per_token":
        return torch.rand(t, generator=gen)
    return kind


def make_ffn(t, d, f, e, dtype, gated, bias, gen):
    x = torch.randn(t, d, generator=gen)
    w_gate = torch.randn(f, d, generator=gen) / d**0.5 if gated else None
    w_up = torch.randn(f, d, generator=gen) / d**0.5
    w_down = torch.randn(d, f, generator=gen) / f**0.5
    b_up = torch.randn(f, generator=gen) * 0.1 if bias else None
    b_down = torch.randn(d, generator=gen) * 0.1 if bias else None
    logits = torch.randn(t, e, generator=gen) * 2
    cast = lambda w: None if w is None else w.to(dtype)  # noqa: E731
    return cast(x), cast(w_gate), cast(w_up), cast(w_down), cast(b_up), cast(b_down), logits


# ----------------------------------------------------------------------------- route


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("e", [4, 16, 64, 128])
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.5, 0.9, 1.0, "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(backend, t, e, budget, dtype):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(hash((t, e, str(budget))) % 2**31)
    logits = (torch.randn(t, e, generator=gen) * 3).to(dtype)
    b = budgets_for(budget, t, gen)
    out = ops.route(logits, b, backend=backend)
    bt = b if isinstance(b, torch.Tensor) else torch.full((t,), float(b))
    ref = route_reference(logits, bt, 1, e)
    assert out.dtype == torch.bool and out.shape == (t, e)
    if backend == "triton" and budget not in (0.0, 1.0):
        # the kernel's own exp and summation order: a token whose cumulative mass lies within
        # rounding of a budget inside (0, 1) may flip (seen once in a full run: bf16, budget
        # 0.9, T=E=64); budgets 0 and 1 take one / every expert, exactly
        assert_mask_equal_up_to_rounding(out, ref, logits.float(), bt)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("min_e,max_e", [(0, None), (1, 1), (3, 5), (2, None), (4, 4)])
@pytest.mark.parametrize("budget", [0.0, 0.3, 0.99, 1.0])
def test_route_clamps(backend, min_e, max_e, budget):
    backend_or_skip(backend)
    t, e = 17, 16
    logits = torch.randn(t, e) * 2
    out = ops.route(logits, budget, min_experts=min_e, max_experts=max_e, backend=backend)
    ref = route_reference(logits, torch.full((t,), budget), min_e, e if max_e is None else max_e)
    assert torch.equal(out, ref)
    counts = out.sum(-1)
    assert (counts >= min_e).all() and (counts <= (e if max_e is None else max_e)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_route_ties_break_to_lower_index(backend):
    backend_or_skip(backend)
    logits = torch.zeros(2, 8)  # all experts equally likely
    out = ops.route(logits, torch.tensor([0.25, 0.5]), backend=backend)
    assert out[0].tolist() == [True, True] + [False] * 6
    assert out[1].tolist() == [True] * 4 + [False] * 4


def test_route_budget_one_is_dense_even_with_tiny_probabilities():
    logits = torch.tensor([[0.0, -100.0, -200.0, 50.0]])
    assert ops.route(logits, 1.0, backend="torch").all()


# ------------------------------------------------------------------------ routed_ffn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("e", [4, 16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5, 1.0, "per_token"])
def test_routed_ffn_matches_reference(backend, t, e, dtype, gated, budget):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(hash((t, e, gated, str(budget))) % 2**31)
    d = 37 if e <= 16 else 29  # odd model widths
    f = e * (3 if e <= 16 else 1 if e == 128 else 2)  # expert sizes 3, 2, 1 neurons
    act = "silu" if gated else "gelu"
    x, wg, wu, wd, bu, bd, logits = make_ffn(t, d, f, e, dtype, gated, not gated, gen)
    mask = ops.route(logits, budgets_for(budget, t, gen), backend="torch")
    out = ops.routed_ffn(x, wg, wu, wd, mask, activation=act, b_up=bu, b_down=bd, backend=backend)
    up = lambda w: None if w is None else w.double()  # noqa: E731
    ref = routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, act, up(bu), up(bd))
    assert out.dtype == dtype and out.shape == (t, d)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("e", [4, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5, "per_token"])
def test_routed_ffn_packed_matches_reference(backend, t, e, dtype, gated, budget):
    """The packed layout (W_down^T [F, d], prepack_ffn) through every backend."""
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(hash((t, e, gated, str(budget), "packed")) % 2**31)
    d, f = (37, 3 * e) if e <= 16 else (29, 2 * e)
    act = "silu" if gated else "gelu"
    x, wg, wu, wd, bu, bd, logits = make_ffn(t, d, f, e, dtype, gated, not gated, gen)
    mask = ops.route(logits, budgets_for(budget, t, gen), backend="torch")
    packed = ops.prepack_ffn(wg, wu, wd, b_up=bu, b_down=bd, activation=act)
    out = packed(x, mask, backend=backend)
    up = lambda w: None if w is None else w.double()  # noqa: E731
    ref = routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, act, up(bu), up(bd))
    assert out.dtype == dtype and out.shape == (t, d)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_ffn_packed_gradients_match_reference(backend):
    backend_or_skip(backend)
    x, wg, wu, wd, _, _, logits = make_ffn(3, 16, 32, 4, torch.float32, True, False,
                                           torch.Generator().manual_seed(8))
    mask = ops.route(logits, 0.6)
    wdt = wd.t().contiguous().requires_grad_()
    ops.routed_ffn_packed(x, wg, wu, wdt, mask, backend=backend).sum().backward()
    ref_wdt = wd.t().contiguous().requires_grad_()
    ops.routed_ffn_packed(x, wg, wu, ref_wdt, mask, backend="torch").sum().backward()
    torch.testing.assert_close(wdt.grad, ref_wdt.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_routed_ffn_activations(backend, activation, gated):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(7)
    x, wg, wu, wd, bu, bd, logits = make_ffn(5, 24, 64, 8, torch.float32, gated, True, gen)
    mask = ops.route(logits, 0.6)
    out = ops.routed_ffn(x, wg, wu, wd, mask, activation=activation, b_up=bu, b_down=bd,
                         backend=backend)
    up = lambda w: None if w is None else w.double()  # noqa: E731
    ref = routed_ffn_reference(up(x), up(wg), up(wu), up(wd), mask, activation, up(bu), up(bd))
    assert_close_rel(out, ref, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_ffn_all_experts_is_dense_ffn(backend):
    backend_or_skip(backend)
    x, wg, wu, wd, _, _, _ = make_ffn(9, 40, 96, 12, torch.float32, True, False,
                                      torch.Generator().manual_seed(3))
    mask = torch.ones(9, 12, dtype=torch.bool)
    dense = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T) @ wd.T
    out = ops.routed_ffn(x, wg, wu, wd, mask, backend=backend)
    assert_close_rel(out, dense.double(), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_ffn_no_experts_gives_bias_only(backend):
    backend_or_skip(backend)
    x, wg, wu, wd, bu, bd, _ = make_ffn(4, 16, 32, 4, torch.float32, False, True,
                                        torch.Generator().manual_seed(4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    out = ops.routed_ffn(x, None, wu, wd, mask, activation="relu", b_up=bu, b_down=bd,
                         backend=backend)
    torch.testing.assert_close(out, bd.expand(4, 16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_routed_ffn_gradients_match_reference(backend):
    """With autograd on, every backend gives the reference's gradients (the kernels have no
    backward: the op falls back to the differentiable reference, never a silent zero)."""
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(5)
    x, wg, wu, wd, _, _, logits = make_ffn(6, 24, 48, 8, torch.float32, True, False, gen)
    mask = ops.route(logits, 0.5)
    grads = {}
    for name in ("torch", backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, wg, wu, wd)]
        out = ops.routed_ffn(*leaves, mask, backend=name)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for g, want in zip(grads[backend], grads["torch"]):
        assert g is not None
        torch.testing.assert_close(g, want)
    assert grads["torch"][3].abs().sum() > 0


# ------------------------------------------------------------------------- bad input


def test_bad_budget():
    logits = torch.randn(3, 4)
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            ops.route(logits, bad)
    with pytest.raises(ValueError, match="budget"):
        ops.route(logits, torch.tensor([0.5, 1.5, 0.2]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        ops.route(logits, torch.tensor([0.5, float("nan"), 0.2]))
    long_logits = torch.randn(100, 4)  # more than 64 tokens: the check runs as tensor ops
    for bad in (-0.5, float("nan")):
        b = torch.rand(100)
        b[77] = bad
        with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
            ops.route(long_logits, b)
    ops.route(long_logits, torch.rand(100))  # in range: fine
    with pytest.raises(ValueError, match="budget"):
        ops.route(logits, torch.rand(4))
    with pytest.raises(ValueError, match="budget"):
        ops.route(logits, "0.5")


def test_bad_logits_and_clamps():
    with pytest.raises(ValueError, match="logits"):
        ops.route(torch.randn(3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="logits"):
        ops.route(torch.ones(3, 4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="min_experts"):
        ops.route(torch.randn(3, 4), 0.5, min_experts=5)
    with pytest.raises(ValueError, match="max_experts"):
        ops.route(torch.randn(3, 4), 0.5, min_experts=2, max_experts=1)
    with pytest.raises(ValueError, match="backend"):
        ops.route(torch.randn(3, 4), 0.5, backend="tpu")


def test_bad_ffn_shapes():
    x, wg, wu, wd, _, _, _ = make_ffn(3, 8, 12, 4, torch.float32, True, False,
                                      torch.Generator().manual_seed(0))
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="divisible"):
        ops.routed_ffn(x, wg, wu, wd, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="w_down"):
        ops.routed_ffn(x, wg, wu, wd.T.contiguous(), mask)
    with pytest.raises(ValueError, match="w_gate"):
        ops.routed_ffn(x, wg[:6], wu, wd, mask)
    with pytest.raises(ValueError, match="mask"):
        ops.routed_ffn(x, wg, wu, wd, mask.int())
    with pytest.raises(ValueError, match="mask"):
        ops.routed_ffn(x, wg, wu, wd, mask[:2])
    with pytest.raises(ValueError, match="activation"):
        ops.routed_ffn(x, wg, wu, wd, mask, activation="swish")
    with pytest.raises(ValueError, match="dtype"):
        ops.routed_ffn(x, wg.double(), wu, wd, mask)
    with pytest.raises(ValueError, match="x"):
        ops.routed_ffn(x[None], wg, wu, wd, mask)


def test_missing_backend_names_the_fix(monkeypatch):
    from prunepath.ops import autotune, cpp_backend

    monkeypatch.setattr(cpp_backend, "_load", lambda: ImportError("No module named 'prunepath._C'"))
    autotune.clear()
    with pytest.raises(ops.BackendUnavailable, match="no-build-isolation"):
        ops.route(torch.randn(2, 4), 0.5, backend="cpu")
    # "auto" falls back to the reference instead of failing
    assert ops.route(torch.randn(2, 4), 0.5).shape == (2, 4)
    autotune.clear()


def test_op_table_names_a_reference_and_an_implementation_per_backend():
    from prunepath.ops import backends, registry

    assert {"route", "routed_ffn", "routed_ffn_packed", "router_route", "router_routed_ffn",
            "linear", "masked_act", "routed_act"} <= set(registry.OPS)
    for op in registry.OPS.values():
        assert callable(op.reference) and "torch" in op.impls, op.name
        for backend, fn_name in op.impls.items():
            assert backend in ops.BACKENDS
            assert callable(getattr(backends._MODULES[backend], fn_name)), (op.name, backend)
    with pytest.raises(ValueError, match="no 'cuda' implementation"):
        registry.implementation("masked_act", "cuda")
    with pytest.raises(ValueError, match="unknown op"):
        registry.implementation("nope", "torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_table_implementations_match_references(backend):
    """Each table entry's implementation against its reference, called as the ops call it."""
    from prunepath.ops import registry, reference

    backend_or_skip(backend)

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 16, generator=gen)
    wg, wu = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    wd = torch.randn(16, 32, generator=gen)
    w1 = torch.randn(8, 16, generator=gen)
    logits = torch.randn(3, 8, generator=gen)
    b = torch.full((3,), 0.6)
    mask = reference.route_reference(logits, b, 1, 8)
    ffn = (x, wg, wu, wd, mask, "silu", None, None)
    assert torch.equal(registry.implementation("route", backend)(logits, b, 1, 8), mask)
    torch.testing.assert_close(registry.implementation("routed_ffn", backend)(*ffn),
                               reference.routed_ffn_reference(*ffn), rtol=1e-4, atol=1e-4)
    packed = (x, wg, wu, wd.t().contiguous(), mask, "silu", None, None)
    torch.testing.assert_close(registry.implementation("routed_ffn_packed", backend)(*packed),
                               reference.routed_ffn_packed_reference(*packed), rtol=1e-4,
                               atol=1e-4)
    router = (x, w1, None, None, None, "none")
    want = reference.router_route_reference(*router, b, 1, 8)
    got = registry.implementation("router_route", backend)(*router, 0.6, 1, 8)
    assert_mask_equal_up_to_rounding(got, want, reference.router_logits_reference(*router), b)
    y, m = registry.implementation("router_routed_ffn", backend)(*router, 0.6, 1, 8, wg, wu, wd,
                                                                 "silu", None, None)
    torch.testing.assert_close(y, reference.routed_ffn_reference(x, wg, wu, wd, m),
                               rtol=1e-4, atol=1e-4)
