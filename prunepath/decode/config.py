"""``DecodeConfig``: every option of :class:`~prunepath.decode.Decoder` and
:func:`~prunepath.decode.generate` in one dataclass (validated when made).

>>> cfg = prunepath.decode.DecodeConfig(mode="compile", record_stats=True)
>>> dec = prunepath.decode.Decoder(model, 1, 512, cfg)
>>> dec = prunepath.decode.Decoder(model, 1, 512, mode="compile")   # the same: fields as keywords
"""

from __future__ import annotations

import dataclasses

MODES = ("auto", "eager", "graph", "compile")
FFN_PATHS = ("auto", "sparse", "dense")
STEPS = ("auto", "hf", "lean")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How a :class:`~prunepath.decode.Decoder` runs and which layouts it gives the model.

    Attributes:
        mode: ``"graph"`` (CUDA graph per step, GPU only), ``"compile"``
            (``torch.compile(mode="reduce-overhead")``), ``"eager"``, or ``"auto"`` (graph on
            CUDA, eager on the CPU).
        ffn_path: ``"auto"``, ``"sparse"`` or ``"dense"`` (:mod:`prunepath.decode.decoder`).
        check_every: decode steps between host checks of "all sequences ended".
        record_stats: count the decode steps' active experts in the routed layers'
            statistics (:func:`prunepath.stats`). Off by default: recording costs a few small
            kernels per layer in every step (~0.3 ms of a 9 ms Llama-3-8B step on an H100).
            The prefill records as the layers are set (:func:`prunepath.set_stats_recording`);
            pass ``True`` to measure the sparsity of generated tokens.
        fast_linears: route the model's ``nn.Linear`` layers through the C++
            matrix-vector kernel in decode steps (:mod:`prunepath.decode.fast_linear`; CPU
            only, same results up to fp32 summation order). ``None`` (default): on for a CPU
            model (where ``torch.nn.functional.linear`` streams weights at about half the
            memory rate), off on a GPU.
        packed_down: store the routed layers' ``W_down`` transposed
            (:mod:`prunepath.decode.packed_down`: same values, no extra memory) so the FFN
            kernels read each active expert's down block as contiguous rows. ``None``
            (default): on where the fast linears are (a CPU model: :func:`prunepath.ops.linear`
            reads the transposed weight at the dense rate, so dense steps keep their speed and
            sparse ones gain; BENCHMARKS.md), off on a GPU (no gain measured at E=64).
        step: how a forward runs: ``"hf"`` (the model's own forward over a
            ``transformers.StaticCache``; any family that supports one), ``"lean"``
            (:class:`prunepath.decode.lean_step.LeanStep`: a hand-written forward over the same
            modules with its own static cache; Llama, Mistral, Qwen2/3 with full attention)
            or ``"auto"`` (default): lean where it can run the model, else hf. Same tokens;
            lean is the faster step on a GPU and a CPU (BENCHMARKS.md).
        fuse_qkv: with the lean step, store each attention's q/k/v weights as one tensor
            (:mod:`prunepath.decode.fused_qkv`) so a step computes them with one product.
            ``None`` (default): on; ``False`` leaves the model's layout alone.
        stack_ffn: store each gated MLP's W_gate and W_up (and a routed layer's folded
            router) as rows of one tensor (:mod:`prunepath.decode.stacked_ffn`) so a dense FFN
            computes both up projections with one product, and the masked-dense FFN path
            those and the router's projection with one product. ``None`` (default): on for a
            GPU model.
        fuse_routing: sparse steps run each routed layer's routing and FFN as one
            :func:`prunepath.ops.router_routed_ffn` call. ``None`` (default): the layers' own
            setting (off unless set; no gain measured on a CPU or an H200). Same tokens.

    Every layout change and patch is undone by :meth:`Decoder.close` /
    :func:`prunepath.decode.restore` (and :func:`prunepath.unload`).
    """

    mode: str = "auto"
    ffn_path: str = "auto"
    check_every: int = 16
    record_stats: bool = False
    fast_linears: bool | None = None
    packed_down: bool | None = None
    step: str = "auto"
    fuse_qkv: bool | None = None
    stack_ffn: bool | None = None
    fuse_routing: bool | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.ffn_path not in FFN_PATHS:
            raise ValueError(f"ffn_path must be one of {FFN_PATHS}, got {self.ffn_path!r}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {self.step!r}")
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {self.check_every!r}")

    @classmethod
    def make(cls, config: DecodeConfig | None = None, **options) -> DecodeConfig:
        """``config`` (default: the defaults) with ``options`` (field names) replaced."""
        config = cls() if config is None else config
        if not isinstance(config, cls):
            raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown decode option(s) {sorted(unknown)}; "
                            f"DecodeConfig fields: {[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(config, **options) if options else config


__all__ = ["DecodeConfig", "FFN_PATHS", "MODES", "STEPS"]
