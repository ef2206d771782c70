"""Fast generation for PrunePath (and dense) models: :class:`Decoder`, :func:`generate`.

* :mod:`~prunepath.decode.decoder`: the static-cache decode loop (CUDA graphs, compile);
* :mod:`~prunepath.decode.config`: :class:`DecodeConfig`, every option in one dataclass;
* :mod:`~prunepath.decode.lean_step`: a hand-written decode step for Llama-family models;
* the layouts and patches a decoder gives the model for speed, each with its undo:
  :mod:`~prunepath.decode.fast_linear` (C++ GEMV in ``nn.Linear``),
  :mod:`~prunepath.decode.packed_down` (W_down stored transposed),
  :mod:`~prunepath.decode.stacked_ffn` (W_gate/W_up/router rows in one tensor),
  :mod:`~prunepath.decode.fused_qkv` (q/k/v in one tensor).

:func:`restore` (or :meth:`Decoder.close`, or :func:`prunepath.unload`) undoes all of them.
"""

from __future__ import annotations

from . import fast_linear, fused_qkv, lean_step, packed_down, stacked_ffn
from .config import FFN_PATHS, MODES, STEPS, DecodeConfig
from .decoder import Decoder, HostSyncError, generate, no_host_sync, restore, routed_layers

__all__ = ["Decoder", "DecodeConfig", "generate", "restore", "no_host_sync", "HostSyncError",
           "routed_layers", "MODES", "FFN_PATHS", "STEPS", "fast_linear", "fused_qkv",
           "lean_step", "packed_down", "stacked_ffn"]
