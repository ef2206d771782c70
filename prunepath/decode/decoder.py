"""Fast generation: static KV cache, one-token steps on device, CUDA graphs.

A gpt-fast-style decode loop over any Hugging Face causal LM that supports
``transformers.StaticCache`` (Llama, Mistral, Qwen, Gemma, ...), routed (PrunePath) or dense;
Llama-family models run a hand-written forward over their own modules
(:mod:`prunepath.decode.lean_step`, ``step="auto"``), the others their own forward:

>>> out = prunepath.generate(model, input_ids, max_new_tokens=128, budget=0.5)

or, to keep the cache and captured graphs between calls (what a server does):

>>> dec = prunepath.decode.Decoder(model, batch_size=4, max_length=1024)
>>> out = dec.generate(input_ids, 128, temperature=0.7, top_k=50)
>>> dec.close()    # the model as it was before (layouts, patches, training mode)

Every option is a field of one :class:`~prunepath.decode.DecodeConfig` (also accepted as
keywords: ``Decoder(model, 1, 512, mode="compile")``).

How one generation runs:

1. **Prefill** (eager): the prompt goes through the model once, filling the static KV cache;
   the first new token is chosen from the last position's logits.
2. **Decode**: one token per step. The whole step -- model forward, token choice, EOS
   bookkeeping, writing the token into the output buffer -- reads and writes only device
   tensors (``Decoder._token``, ``_pos``, ``_n``, ``_done``, ``_out``), so it can be captured
   once as a CUDA graph (``mode="graph"``) or compiled (``mode="compile"``,
   ``torch.compile(mode="reduce-overhead")``) and replayed. The host never reads a token:
   it only checks "is every sequence done?" once every ``check_every`` steps.
3. The PrunePath budget lives in a device tensor inside each routed layer
   (:func:`prunepath.set_budget` updates it in place), so a new budget is picked up by the
   same captured graph: nothing is recaptured or recompiled.

``ffn_path`` chooses how routed FFNs run during decode: ``"sparse"`` (block-sparse kernels
read only the active experts), ``"dense"`` (the dense matmuls over every expert with the
inactive neurons zeroed -- same result, dense cost: :func:`prunepath.ops.router_masked_dense_ffn`
for the usual folded routers, whose projection is a few more rows of the up GEMM when the
weights are stacked (``stack_ffn``) and whose routing runs inside the activation kernel -- an
H100 compiled batch-8 step costs 1.03x the dense one, BENCHMARKS.md -- else
:func:`prunepath.ops.masked_dense_ffn`, the mask made first) or ``"auto"``
(default): one step of each is timed once per budget on the live cache (after capturing
both, with CUDA graphs) and the faster one runs, so decoding is never slower than dense
when the union of a batch's experts is nearly everything. On a GPU the sparse candidates
are the kernel backends themselves ("triton", "cuda"), each timed on the live masks.
``mode="compile"`` times the two paths only on a GPU with batch > 1 (each path then compiles
its own step); at batch 1 and on a CPU it runs "sparse".

On the CPU the model's ``nn.Linear`` layers run decode steps through the C++ matrix-vector
kernel (``fast_linears``, :mod:`prunepath.decode.fast_linear`): dense and PrunePath steps alike.

Decode steps do not update the routed layers' statistics (:func:`prunepath.stats`) unless
``record_stats=True``: the counters cost a few small kernels per layer per step.
"""

from __future__ import annotations

import contextlib
import time
import types

import torch

from .. import ops
from ..budget import set_budget
from ..layers import RoutedFFN, frozen
from ..layers import routed_layers as _routed_layers
from ..ops import checks
from . import fast_linear, fused_qkv, stacked_ffn
from . import packed_down as _packed_down
from .config import FFN_PATHS, MODES, STEPS, DecodeConfig
from .lean_step import LeanStep, unsupported

_MAX_EOS = 16  # size of the device buffer of end-of-sequence ids


# --------------------------------------------------------------------------- helpers


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def routed_layers(model) -> list[RoutedFFN]:
    """The PrunePath routed FFN modules of ``model`` (empty for a dense model)."""
    return _routed_layers(model, required=False)


def _routing_key(layers) -> tuple:
    """The host-side routing state a captured step depends on (a change means a new capture).
    Budget *values* are not part of it: they live in device buffers the step reads. Each
    layer's :class:`~prunepath.layers.RoutingSettings` (policy, k, backends, statistics
    recording, ...) and a replaced router module (a new object: a captured graph would still
    read the old one's tensors) are. ``_dense_budget`` (every budget exactly 1.0: the exact
    dense path) only counts under the budget policy."""
    return tuple(
        (m.settings, m.settings.policy == "budget" and m._dense_budget,
         tuple(m.budget.shape), m.budget.data_ptr(), id(m.router), _fused_ptrs(m))
        for m in layers
    )


_SIMPLE = (str, int, float, bool)  # (not None: a cache filled on first use is not a change)


def _model_key(model) -> tuple:
    """What a compiled step assumes of the model beyond the routing key, read once per
    :meth:`Decoder.decode` call: the module tree (types and objects, hooks, plain attribute
    values such as the fast-linear flag or the training mode; a routed layer's routing state is
    :func:`_routing_key`'s) and every parameter's and buffer's
    shape, strides, dtype, device and storage aliasing. On a CPU the compiled step skips
    Dynamo's per-step guards on the model's modules (``_compile_options``), so a change to any
    of these between decode calls must select (or compile) another step, never replay a graph
    made for the old model."""
    from torch.nn.modules import module as nn_module

    modules = tuple(  # (a routed layer's attributes: _routing_key, exactly)
        (type(m), id(m), len(m._forward_hooks), len(m._forward_pre_hooks),
         () if isinstance(m, RoutedFFN) else
         tuple((k, v) for k, v in m.__dict__.items() if isinstance(v, _SIMPLE)))
        for m in model.modules())
    storages: dict[int, int] = {}  # storage address -> order of first use (tied weights)
    tensors = tuple(
        (name, tuple(t.shape), t.stride(), t.dtype, t.device, t.storage_offset(),
         storages.setdefault(t.untyped_storage().data_ptr(), len(storages)))
        for name, t in (*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)))
    hooks = (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks))
    return modules, tensors, hooks


def _compile_options(device: torch.device):
    """``torch.compile`` arguments of a compiled step. On a CPU, Dynamo's guards on the
    model's modules -- thousands per step: types, hook dicts, attributes, parameter metadata --
    cost ~8-11% of a SmolLM2 step, so they are skipped and :func:`_model_key` stands in for
    them once per decode call (BENCHMARKS.md; inductor's C++ wrapper, another
    4-6% per step there, is left off: it made a cold compile 43 -> 103 s). The same key covers
    what inductor's per-call ``size_asserts`` check (every input's size and stride, ~550 Python
    calls per SmolLM2 step), so those are off too: 1.02x dense, 1.03-1.05x s50 per step
    (BENCHMARKS.md). On a GPU the step
    replays as CUDA graphs (what ``mode="reduce-overhead"`` sets: ``triton.cudagraphs``) with
    the guards kept. Inductor's ``freezing`` is off whatever the global config says: it turns
    the modules' buffers into constants too, and a compiled step then ignores a new budget
    (once seen: s50 -> s30 decoded the s50 tokens)."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if device.type != "cpu" or skip is None:
        return {"options": {"triton.cudagraphs": device.type == "cuda", "freezing": False}}
    return {"options": {"guard_filter_fn": skip, "freezing": False, "size_asserts": False}}


def _own_code(method, tag: str):
    """``method`` (bound) as a function with a code object of its own: Dynamo keeps compiled
    graphs and their guards per code object, so a step compiled for one model key can never be
    picked for another by guards that no longer look at the model."""
    f = method.__func__
    code = f.__code__.replace(co_name=f"{f.__name__}_{tag}")
    g = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)


def _fused_ptrs(layer) -> tuple:
    """Storage of the layer's cached fused-router tensors (a captured step reads them)."""
    cached = getattr(layer, "_fused", None)
    if cached is None:
        return ()
    return tuple(0 if t is None else t.data_ptr() for t in cached[2][:4])


def _sparse_backends(device: torch.device) -> list[str]:
    """Explicit routed-FFN kernel backends the "auto" FFN path times on ``device`` (GPU)."""
    if device.type != "cuda":
        return []
    return [b for b in ("triton", "cuda") if b in ops.available_backends(device)]


def _time_ms(fn, device: torch.device) -> float:
    """Milliseconds ``fn()`` takes (device events on CUDA, a host clock otherwise)."""
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class HostSyncError(RuntimeError):
    """Raised by :func:`no_host_sync` when code reads a device value on the host."""


# aten ops that need the host to see tensor values (a device->host sync on a GPU)
_SYNC_OPS = (
    "aten::_local_scalar_dense",  # .item(), bool(t), int(t), .tolist()
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::repeat_interleave",  # with a tensor of repeats: output size depends on values
    "aten::isin",  # on CUDA, larger test sets take a sorting path that syncs (seen on an H100)
)


@contextlib.contextmanager
def no_host_sync():
    """Fail if the code inside reads tensor values on the host (checks the aten ops it runs).

    Used by the tests on the CPU to show that a decode step could be captured as a CUDA
    graph: ``.item()``, ``bool(tensor)``, ``nonzero`` and other data-dependent ops raise
    :class:`HostSyncError` naming the op. ``torch.cuda.is_current_stream_capturing`` (and
    prunepath's own argument checks) report a capture meanwhile, so libraries take the
    branches they take during a real CUDA graph capture.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in _SYNC_OPS and not (func is torch.ops.aten.repeat_interleave.self_int):
                raise HostSyncError(f"host sync inside a decode step: {func}")
            return func(*args, **(kwargs or {}))

    real = torch.cuda.is_current_stream_capturing, checks._tracing
    torch.cuda.is_current_stream_capturing = checks._tracing = lambda: True
    try:
        with _Mode():
            yield
    finally:
        torch.cuda.is_current_stream_capturing, checks._tracing = real


# --------------------------------------------------------------------------- decoder


class Decoder:
    """Static-cache decoder for one batch size and maximum length (prompt + new tokens).

    Args:
        model: a Hugging Face causal LM (dense or converted by :func:`prunepath.convert`).
        batch_size: sequences per call.
        max_length: cache length = longest prompt + ``max_new_tokens`` this decoder will see.
        config: a :class:`~prunepath.decode.DecodeConfig` (default: its defaults); its
            fields may also be passed as keywords (``mode="compile"``), which replace the
            config's.

    The decoder changes the model in place for speed (layouts of weights, patched
    ``nn.Linear`` forwards, eval mode; see :class:`~prunepath.decode.DecodeConfig`):
    :meth:`close` (or :func:`prunepath.decode.restore`, or :func:`prunepath.unload`) undoes
    all of it, leaving ``state_dict`` and outputs bit-identical to before.
    """

    def __init__(self, model, batch_size: int, max_length: int,
                 config: DecodeConfig | None = None, **options):
        from transformers import StaticCache

        self.config = cfg = DecodeConfig.make(config, **options)
        mode, ffn_path, step = cfg.mode, cfg.ffn_path, cfg.step
        fast_linears, packed_down = cfg.fast_linears, cfg.packed_down
        fuse_qkv, stack_ffn = cfg.fuse_qkv, cfg.stack_ffn
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self._was_training = model.training
        self.model = model.eval()
        self.device, self.dtype = _model_device_dtype(model)
        if mode == "auto":
            mode = "graph" if self.device.type == "cuda" else "eager"
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError(f"mode='graph' needs a model on a CUDA device, got {self.device}")
        self.mode, self.batch_size, self.max_length = mode, batch_size, max_length
        self.check_every = cfg.check_every
        self.record_stats = bool(cfg.record_stats)
        self.fuse_routing = None if cfg.fuse_routing is None else bool(cfg.fuse_routing)
        if fast_linears is None:
            fast_linears = self.device.type == "cpu"
        if fast_linears:
            fast_linear.enable(model)
        self.fast_linears = fast_linear.enabled(model) > 0  # (0 without the extension)
        if packed_down is None:
            packed_down = self.fast_linears
        if packed_down:
            _packed_down.pack(model)
        self.layers = routed_layers(model)
        # with no routed layers there is nothing to choose
        self.ffn_path = ffn_path if self.layers else "dense"
        if step == "auto":
            step = "hf" if unsupported(model, max_length) else "lean"
        self.step_kind = step
        if stack_ffn is None:
            stack_ffn = self.device.type == "cuda"
        if stack_ffn:
            stacked_ffn.stack(model)
        if step == "lean":
            if fuse_qkv is not False:  # None, the default: on
                fused_qkv.fuse(model)
            self.lean, self.cache = LeanStep(model, batch_size, max_length), None
        else:
            self.lean, self.cache = None, StaticCache(config=model.config, max_cache_len=max_length)

        dev, b = self.device, batch_size
        # The device-side state of a generation. Steps only update these in place.
        self._token = torch.zeros(b, dtype=torch.long, device=dev)  # last chosen token
        self._pos = torch.zeros(b, dtype=torch.long, device=dev)  # its position id
        self._n = torch.zeros(1, dtype=torch.long, device=dev)  # tokens emitted so far
        self._done = torch.zeros(b, dtype=torch.bool, device=dev)  # sequence hit EOS
        self._out = torch.zeros(b, max_length, dtype=torch.long, device=dev)  # emitted tokens
        self._attn = torch.ones(b, max_length, dtype=torch.long, device=dev)  # padding mask
        self._temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self._eos = torch.full((_MAX_EOS,), -1, dtype=torch.long, device=dev)  # -1 = unused
        self._pad = torch.zeros((), dtype=torch.long, device=dev)
        self._padded = False  # does any prompt have left padding (pass the 2-D mask)?
        self._steps = {}  # (greedy, top_k, padded, ffn_path, ...) -> callable running one step
        self._compile_kwargs = _compile_options(self.device)
        # compiled CPU steps skip Dynamo's module guards: their key holds _model_key instead
        self._unguarded = mode == "compile" and "guard_filter_fn" in self._compile_kwargs["options"]
        self._path_choice = {}  # budget key -> "sparse" | "dense" (ffn_path="auto")
        self._graph_pool = None
        # the masked-dense FFN path routes on this stream beside the up projections
        self._router_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self._key_refs = []  # routers named (by id) in the keys of self._steps
        self.last_path = None  # FFN path of the last decode ("sparse" / "dense")
        self.last_ffn_backend = None  # the routed-FFN backend "auto" chose for it (or None)
        self.path_timings = None  # ms per step of each path, when ffn_path="auto" timed them

    def close(self) -> None:
        """Give the model back as it was before this decoder: every layout and patch undone
        (:func:`restore`) and its training mode back. Make a new decoder to decode again."""
        restore(self.model)
        self.model.train(self._was_training)
        self._steps.clear()
        self._path_choice.clear()
        self._key_refs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one step ---------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, greedy: bool, top_k: int | None) -> torch.Tensor:
        """Next token per row from last-position logits [B, V], on device."""
        if greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self._temperature
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # Gumbel/exponential trick: argmax(p / Exp(1)) ~ Categorical(p), with no host sync
        # (torch.multinomial may synchronize).
        return (probs / torch.empty_like(probs).exponential_(1.0)).argmax(dim=-1)

    def _emit(self, logits: torch.Tensor, greedy: bool, top_k: int | None) -> None:
        nxt = self._choose(logits, greedy, top_k)
        nxt = torch.where(self._done, self._pad, nxt)
        # not torch.isin: on CUDA it may take a sort/unique path that cannot be captured
        self._done |= (nxt.unsqueeze(-1) == self._eos).any(-1)
        self._token.copy_(nxt)
        self._out.index_copy_(1, self._n, nxt.unsqueeze(1))
        self._n += 1

    def _forward_step(self, greedy: bool, top_k: int | None, padded: bool) -> None:
        mask = self._attn if padded else None
        if self.lean is not None:
            logits = self.lean(self._token.unsqueeze(1), self._pos.unsqueeze(1), mask)
        else:
            logits = self.model(input_ids=self._token.unsqueeze(1), attention_mask=mask,
                                position_ids=self._pos.unsqueeze(1), past_key_values=self.cache,
                                use_cache=True).logits[:, -1, :]
        self._pos += 1
        self._emit(logits, greedy, top_k)

    @contextlib.contextmanager
    def _ffn_path(self, path: str):
        """Routed FFNs run ``path`` inside the block ("sparse": their own backend;
        "sparse:NAME": kernel backend NAME; "dense": :func:`prunepath.ops.masked_dense_ffn`,
        cuBLAS with the routing on a side stream), with statistics recording off unless this
        decoder records them: one :meth:`~prunepath.layers.RoutedFFN.configure` per layer,
        and the layer's own settings are put back afterwards."""
        kind, _, backend = path.partition(":")
        changes = {}
        if kind == "dense":
            changes.update(masked_dense=True, router_stream=self._router_stream)
        else:
            if backend:
                changes["ffn_backend"] = backend
            if self.fuse_routing is not None:
                changes["fuse_routing"] = self.fuse_routing
        if not self.record_stats:
            changes["record_stats"] = False
        own = [m.configure(**changes) for m in self.layers]
        try:
            yield
        finally:
            for m, settings in zip(self.layers, own):
                m.configure(settings)

    def _prepare_routers(self) -> None:
        """Fold (or refresh in place) every routed layer's fused router before a step is
        captured or replayed: a replayed graph reads the cached folded tensors; and let each
        find its stacked weight views (a traced step reads what it found)."""
        for m in self.layers:
            fold = getattr(m, "fused_router", None)
            if fold is not None:
                fold(self.dtype)
            views = getattr(m, "stacked_views", None)
            if views is not None:
                views()

    def _step_fn(self, greedy: bool, top_k: int | None, path: str):
        """A callable that runs one decode step (captured / compiled on first use). Call it
        inside ``self._ffn_path(path)``, entered once around a loop of steps: setting and
        restoring every routed layer's path attributes costs ~0.2 ms of Python per entry on a
        CPU (SmolLM2), too much for each step of a compiled loop.

        One capture per (sampling kind, padding, FFN path, host-side routing state and, for
        a compiled CPU step, :func:`_model_key`): a new budget *value* reuses it; switching
        budget 1.0 (exact dense) <-> < 1.0, the routing policy, the budget's shape or the
        model's layout captures anew."""
        key = (greedy, top_k, self._padded, path, self.record_stats, _routing_key(self.layers),
               _model_key(self.model) if self._unguarded else None)
        if key in self._steps:
            return self._steps[key]
        padded = self._padded

        def bare_step():
            self._forward_step(greedy, top_k, padded)

        def eager_step():  # on its own: warm-up and capture
            with self._ffn_path(path):
                bare_step()

        if self.mode == "eager":
            fn = bare_step
        elif self.mode == "compile":
            lean = self.lean.tensors() if self.lean is not None else []
            for t in (self._token, self._pos, self._n, self._done, self._out, self._attn, *lean):
                torch._dynamo.mark_static_address(t)
            # One eager step first (state restored): the ops' backend choices (autotune,
            # which may read its disk cache) are then made and cached, so tracing finds them
            # in memory. A graph break there (file I/O) split the step per decoder layer, and
            # HF's per-layer int layer_idx then recompiled each piece until dynamo's limit.
            with self.preserved_state():
                eager_step()
            # a fresh options dict per compile: torch.compile pops "guard_filter_fn" out of the
            # one it is given, and a shared dict left every later step with all module guards
            # (+1.2-1.8 ms per SmolLM2 step, all but the first compiled step)
            kwargs = {k: dict(v) if isinstance(v, dict) else v
                      for k, v in self._compile_kwargs.items()}
            compiled = torch.compile(_own_code(self._forward_step, str(len(self._steps))),
                                     **kwargs)

            def fn():
                compiled(greedy, top_k, padded)
        else:
            fn = self._capture(eager_step)
        self._steps[key] = fn
        # the key holds id(router): keep those routers alive so no new router reuses an id
        self._key_refs.append([m.router for m in self.layers])
        return fn

    def _state(self) -> list[torch.Tensor]:
        """Every device tensor a step advances (decoder state, cache lengths, layer stats)."""
        if self.lean is not None:
            cache = [self.lean.slot]
        else:
            cache = [layer.cumulative_length for layer in self.cache.layers
                     if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        stats = [t for m in self.layers for t in (m.last_active, m.active_sum, m.token_count)]
        return [self._token, self._pos, self._n, self._done, self._out, *cache, *stats]

    def _capture(self, eager_step):
        """Capture ``eager_step`` as a CUDA graph; returns a function that replays it.

        Warm-up steps run first (on a side stream, as CUDA graphs need): they write the KV
        cache one slot past the current position, which the real steps overwrite before
        anything reads it; every piece of state they advance is restored afterwards.
        """
        state = self._state()
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                eager_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            eager_step()
        for t, s in zip(state, saved):
            t.copy_(s)
        return graph.replay

    # -- public -----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
    ) -> None:
        """Reset the cache, run the prompt (left-padded when ``attention_mask`` has zeros)
        and choose the first new token. Nothing is returned; :meth:`decode` continues."""
        b, t = self._check_prompt(input_ids, attention_mask)
        greedy = self._sampling_args(temperature, top_k)
        eos = _eos_ids(self.model, eos_token_id)
        if len(eos) > _MAX_EOS:
            raise ValueError(f"at most {_MAX_EOS} eos_token_id values are supported, got {len(eos)}")
        self._eos.fill_(-1)
        if eos:
            self._eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        self._has_eos = bool(eos)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        self._pad.fill_(pad)
        (self.lean if self.lean is not None else self.cache).reset()
        self._done.zero_()
        self._n.zero_()
        self._attn.fill_(1)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device, torch.long)
            self._attn[:, :t].copy_(attention_mask)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            # left padding changes the captured step (it then needs the 2-D mask)
            self._padded = bool((attention_mask == 0).any())
        else:
            self._padded = False
            positions = torch.arange(t, device=self.device).expand(b, t)
        if self.lean is not None:
            logits = self.lean(input_ids.to(self.device), positions,
                               self._attn if self._padded else None)
        else:
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=self._attn[:, :t] if attention_mask is not None else None,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
        self._pos.copy_(positions[:, -1] + 1)
        self._emit(logits, greedy, top_k)
        self._greedy, self._top_k, self._prompt_len = greedy, top_k, t

    @torch.no_grad()
    def decode(self, max_new_tokens: int) -> int:
        """Continue after :meth:`prefill` until ``max_new_tokens`` tokens exist (the prefill's
        token counts) or every sequence has ended. Returns the number of tokens emitted."""
        self._prepare_routers()
        with frozen(self.layers):  # routed layers bind their ops once for the whole loop
            return self._decode(max_new_tokens)

    def _start_loop(self, max_new_tokens: int):
        """For a loop of steps after :meth:`prefill`: how many tokens it may emit in all (the
        prefill's included), its FFN path and its step."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        limit = min(max_new_tokens, self.max_length - self._prompt_len)
        path = self._decode_path()
        self.last_path, _, backend = path.partition(":")
        self.last_ffn_backend = backend or None
        return limit, path, self._step_fn(self._greedy, self._top_k, path)

    def _decode(self, max_new_tokens: int) -> int:
        limit, path, step = self._start_loop(max_new_tokens)
        emitted = 1
        if self._has_eos and bool(self._done.all()):  # the prefill's token ended every row
            return emitted
        with self._ffn_path(path):
            while emitted < limit:
                n = min(self.check_every, limit - emitted)
                for _ in range(n):
                    step()
                emitted += n
                if self._has_eos and bool(self._done.all()):  # one host sync per n steps
                    break
        return emitted

    @torch.no_grad()
    def stream(self, max_new_tokens: int):
        """:meth:`decode`, a token at a time: after :meth:`prefill`, yields each new token as a
        ``[B]`` CPU tensor (the prefill's first) until ``max_new_tokens`` tokens exist or every
        sequence has ended (an ended row yields the pad id). Each token costs one host sync --
        what streaming is -- while the model's key, the FFN path and the step are found once
        for the whole stream, as in :meth:`decode`: a loop of :meth:`step` calls pays them per
        token. While the stream is open the routed layers are bound to their ops
        (:func:`~prunepath.layers.frozen`) and the step is the one chosen for the model as it
        was at the start: change budget values between tokens if you like, but not the model
        (weights replaced, layouts, routers, budget 1.0 <-> below 1.0) -- close the stream
        first (``close()``, or run it to its end)."""
        self._prepare_routers()
        with frozen(self.layers):
            limit, path, step = self._start_loop(max_new_tokens)
            yield self._out[:, 0].cpu()
            with self._ffn_path(path):
                for i in range(1, limit):
                    if self._has_eos and bool(self._done.all()):
                        return
                    step()
                    yield self._out[:, i].cpu()

    @torch.no_grad()
    def step(self, *, eager: bool = False) -> None:
        """One decode step after :meth:`prefill` (the captured/compiled one unless ``eager``).
        A compiled CPU decoder reads the model's key (:func:`_model_key`: ~5 ms for SmolLM2's
        500 modules) at every call, where :meth:`decode` and :meth:`stream` read it once for
        all their steps."""
        self._prepare_routers()
        with frozen(self.layers):
            path = self._decode_path()
            if eager:
                def fn():
                    self._forward_step(self._greedy, self._top_k, self._padded)
            else:
                fn = self._step_fn(self._greedy, self._top_k, path)
            with self._ffn_path(path):
                fn()

    @contextlib.contextmanager
    def preserved_state(self):
        """Steps inside the block leave the generation where it was (for profiling)."""
        state = self._state()
        saved = [t.clone() for t in state]
        try:
            yield
        finally:
            for t, s in zip(state, saved):
                t.copy_(s)

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
        budget=None,
    ) -> torch.Tensor:
        """Prompt + new tokens, ``[B, T + n]`` like ``model.generate`` (ended rows padded
        with ``pad_token_id``, default the first EOS id). ``budget``: see :func:`generate`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if budget is not None:
            set_budget(self.model, budget)
        self.prefill(input_ids, attention_mask, temperature=temperature, top_k=top_k,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        n = self.decode(max_new_tokens)
        new = self._out[:, :n].to(input_ids.device)
        return torch.cat([input_ids, new], dim=1)

    # -- choice of FFN path -------------------------------------------------------------

    def _decode_path(self) -> str:
        if self.ffn_path != "auto":
            return self.ffn_path
        if all(m.settings.policy == "dense" or (m.settings.policy == "budget" and m._dense_budget)
               for m in self.layers):
            return "sparse"  # nothing to choose
        if self.mode == "compile" and (self.device.type != "cuda" or self.batch_size == 1):
            # compiling a second step costs a compile; one token per step (or a CPU) leaves a
            # union the sparse kernels win on, while a GPU batch's union can be near-dense
            return "sparse"
        budgets = tuple(tuple(m.budget.flatten().tolist()) for m in self.layers)
        key = (_routing_key(self.layers), budgets, self.record_stats)
        if key not in self._path_choice:
            self._path_choice[key] = self._time_paths(self._path_candidates())
        return self._path_choice[key]

    def _path_candidates(self) -> list[str]:
        """"dense" and the sparse paths to time: on a GPU, when the layers' routed-FFN backend
        is "auto", each kernel backend explicitly ("sparse:triton", "sparse:cuda") -- the
        ops-level choice is made on synthetic half-density masks, which at a few tokens per
        step have a near-full union and pick the masked-dense kernel; here every candidate
        is timed on the live masks."""
        own = {m.settings.ffn_backend or m.settings.backend for m in self.layers}
        explicit = _sparse_backends(self.device) if own == {"auto"} else []
        return ["dense"] + ([f"sparse:{b}" for b in explicit] or ["sparse"])

    def _time_paths(self, paths=("dense", "sparse"), reps: int = 7) -> str:
        """Time one step of each FFN path on the live state (restored after every step) and
        return the fastest; a sparse path must beat "dense" by 2% to be chosen."""
        state = self._state()
        saved = [t.clone() for t in state]
        ms = {}
        for path in paths:
            try:
                fn = self._step_fn(self._greedy, self._top_k, path)
                times = []
                with self._ffn_path(path):
                    for _ in range(reps + 1):
                        for t, s in zip(state, saved):
                            t.copy_(s)
                        times.append(_time_ms(fn, self.device))
            except Exception:
                if path == "dense" or len(paths) == 2:  # nothing else to fall back on
                    raise
                continue  # an explicit kernel backend that cannot run this step: not chosen
            ms[path] = sorted(times[1:])[reps // 2]
        for t, s in zip(state, saved):
            t.copy_(s)
        self.path_timings = ms
        sparse = min((p for p in ms if p != "dense"), key=ms.get, default=None)
        return sparse if sparse and ms[sparse] < 0.98 * ms["dense"] else "dense"

    # -- argument checks ----------------------------------------------------------------

    def _check_prompt(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, prompt_len] tensor of token ids")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        b, t = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"input_ids has batch {b} but this Decoder was built for {self.batch_size}")
        if t < 1 or t >= self.max_length:
            raise ValueError(f"prompt length {t} must be in [1, max_length={self.max_length})")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must have shape {(b, t)} like input_ids, "
                             f"got {tuple(attention_mask.shape)}")
        return b, t

    def _sampling_args(self, temperature, top_k) -> bool:
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if temperature > 0:
            self._temperature.fill_(float(temperature))
        return temperature == 0


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id=None,
    pad_token_id: int | None = None,
    budget=None,
    config: DecodeConfig | None = None,
    **options,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ([B, T]) with a static KV
    cache and (on CUDA) a CUDA-graph decode step. Returns ``[B, T + n]`` token ids.

    ``temperature=0`` is greedy; otherwise softmax sampling at that temperature, optionally
    restricted to the ``top_k`` most likely tokens. ``budget`` (float, per-layer list or
    preset name, as :func:`prunepath.set_budget` takes) is set on the model first; ``None``
    keeps the current one. Left-padded batches pass ``attention_mask``. ``config`` (a
    :class:`~prunepath.decode.DecodeConfig`) and ``options`` (its fields as keywords, e.g.
    ``mode="compile"``): see :class:`Decoder`. Builds a new :class:`Decoder` per call; keep
    one yourself to reuse the cache and the captured graphs. The model keeps the decoder's
    layouts; :func:`prunepath.decode.restore` undoes them.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, prompt_len] tensor of token ids")
    b, t = input_ids.shape
    dec = Decoder(model, b, t + max_new_tokens, DecodeConfig.make(config, **options))
    return dec.generate(input_ids, max_new_tokens, attention_mask=attention_mask,
                        temperature=temperature, top_k=top_k, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, budget=budget)


@torch.no_grad()
def restore(model) -> int:
    """Undo every change a :class:`Decoder` makes to ``model``'s modules: patched
    ``nn.Linear.forward`` (:mod:`~prunepath.decode.fast_linear`), fused q/k/v
    (:mod:`~prunepath.decode.fused_qkv`), stacked W_gate/W_up and router rows
    (:mod:`~prunepath.decode.stacked_ffn`), transposed W_down
    (:mod:`~prunepath.decode.packed_down`). Afterwards ``state_dict`` (values, dtypes,
    strides) and forward outputs are bit-identical to the model's before decoding. Returns
    how many modules were changed back (0: nothing to undo). (The eval mode the decoder sets
    is restored by :meth:`Decoder.close`.)"""
    return (fast_linear.disable(model) + fused_qkv.unfuse(model) + stacked_ffn.unstack(model)
            + _packed_down.unpack(model))


__all__ = ["Decoder", "DecodeConfig", "generate", "restore", "no_host_sync", "HostSyncError",
           "routed_layers", "MODES", "FFN_PATHS", "STEPS"]
