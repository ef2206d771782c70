"""Choosing a backend for ``backend="auto"``.

This is the one piece of explicit global state in the library: a cache of choices.

* CPU tensors: a static preference (the compiled "cpu" extension, then "torch").
* CUDA tensors: the available GPU backends ("cuda", "triton", "torch") are *measured* once
  per (op, GPU model, dtype, shape, token-count bucket) on synthetic inputs of that shape
  (a random mask with half the experts per token), timed as replays of a CUDA graph (as
  decoding runs them; eager timing would charge Python launch costs that graphs remove),
  and the fastest is remembered in memory
  and on disk in ``platformdirs.user_cache_dir("prunepath")/autotune.json`` (atomic
  write; ``PRUNEPATH_CACHE_DIR`` overrides the folder). Token counts are bucketed to powers
  of two (1, 2, 4, ..., 64, then 128+ as one bucket).
* Never measures while ``torch.compile`` traces or a CUDA graph is being captured: then a
  cached choice is used if there is one, else the static order ("triton", "cuda", "torch").
* ``PRUNEPATH_AUTOTUNE=0`` turns measuring off (static order only).

Ops marked ``measured=False`` in :mod:`.registry` always take the static order.
Forcing a backend (``backend="triton"`` / ``"cuda"``) bypasses all of this
(:func:`prunepath.ops.dispatch.resolve`).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch

from . import backends, registry

_CHOICES: dict = {}
_DISK: dict | None = None  # the disk cache, loaded on first use

_PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}
_FORMAT = 4  # bump when kernels change enough to invalidate stored choices
_MEASURED_DEVICES = ("cuda",)  # device types whose choice is measured (tests add "cpu")


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def token_bucket(t: int) -> int:
    """1, 2, 4, ..., 64 (next power of two), and 128 for every larger count."""
    b = 1
    while b < t and b < 128:
        b *= 2
    return b


def _bucket_key(op: str, key):
    # routed_ffn keys end with the token count
    if op in ("routed_ffn", "routed_ffn_packed") and key:
        return tuple(key[:-1]) + (token_bucket(int(key[-1])),)
    return tuple(key) if key is not None else ()


def _candidates(op: str, device: torch.device) -> list[str]:
    return [n for n in _PREFERENCE.get(device.type, ("torch",))
            if registry.has_implementation(op, n) and backends.supports_device(n, device)
            and backends.is_available(n)]


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(idx)


def _disk_key(op: str, device: torch.device, bkey) -> str:
    parts = [str(_FORMAT), op, _device_name(device), torch.__version__]
    parts += [str(k).replace("torch.", "") for k in bkey]
    return "|".join(parts)


def cache_path() -> str:
    folder = os.environ.get("PRUNEPATH_CACHE_DIR")
    if not folder:
        try:
            import platformdirs

            folder = platformdirs.user_cache_dir("prunepath")
        except ImportError:  # a dependency, but keep working without it
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            folder = os.path.join(base, "prunepath")
    return os.path.join(folder, "autotune.json")


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        try:
            with open(cache_path()) as fh:
                _DISK = json.load(fh)
            if not isinstance(_DISK, dict):
                _DISK = {}
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def _store_disk(dkey: str, entry: dict) -> None:
    """Merge one entry into the cache file: write a temp file beside it, then rename."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as fh:
                current = json.load(fh)
            if not isinstance(current, dict):
                current = {}
        except (OSError, ValueError):
            current = {}
        current[dkey] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(current, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
        _disk()[dkey] = entry
    except OSError:
        _disk()[dkey] = entry  # read-only cache dir: keep it in memory only


def choose(op: str, device: torch.device, key=None) -> str:
    bkey = _bucket_key(op, key)
    cache_key = (op, str(device), bkey)
    hit = _CHOICES.get(cache_key)
    if hit is not None:
        return hit
    cands = _candidates(op, device)
    if not cands:
        return "torch"
    if device.type not in _MEASURED_DEVICES or len(cands) == 1 or not registry.OPS[op].measured:
        _CHOICES[cache_key] = cands[0]
        return cands[0]
    dkey = _disk_key(op, device, bkey)
    stored = _disk().get(dkey)
    if stored is not None and stored.get("choice") in cands:
        _CHOICES[cache_key] = stored["choice"]
        return stored["choice"]
    if _tracing() or os.environ.get("PRUNEPATH_AUTOTUNE", "1") == "0":
        return cands[0]  # static order; measured later, outside tracing/capture
    times = measure(op, device, key, cands)
    if not times:
        _CHOICES[cache_key] = cands[0]
        return cands[0]
    best = min(times, key=times.get)
    _CHOICES[cache_key] = best
    _store_disk(dkey, {"choice": best, "ms": times})
    return best


# ------------------------------------------------------------------------------ measuring


def _synthetic_args(op: str, device: torch.device, key):
    gen = torch.Generator(device=device).manual_seed(0)
    if op == "route":
        (e,) = key
        logits = torch.randn(16, e, device=device, generator=gen) * 2
        return (logits, torch.full((16,), 0.5, device=device), 1, e)
    if op == "router_route":
        dtype, d, e = key
        x = torch.randn(16, d, device=device, dtype=dtype, generator=gen)
        w = torch.randn(e, d, device=device, dtype=dtype, generator=gen) / d**0.5
        return (x, w, None, None, None, "none", torch.full((16,), 0.5, device=device), 1, e)
    dtype, d, f, e, gated, t = key
    t = token_bucket(int(t))
    x = torch.randn(t, d, device=device, dtype=dtype, generator=gen)
    w = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen) / s[-1] ** 0.5  # noqa: E731
    wg = w(f, d) if gated else None
    wu = w(f, d)
    wd = w(f, d) if op == "routed_ffn_packed" else w(d, f)
    mask = torch.rand(t, e, device=device, generator=gen) < 0.5
    return (x, wg, wu, wd, mask, "silu", None, None)


def _runner(op: str, name: str, args):
    fn = registry.implementation(op, name)
    return lambda: fn(*args)


def measure(op: str, device: torch.device, key, candidates, repeats: int = 15) -> dict:
    """Median milliseconds of each candidate backend on synthetic inputs of ``key``'s shape."""
    try:
        args = _synthetic_args(op, device, key)
    except (torch.OutOfMemoryError, RuntimeError, ValueError):
        return {}
    times = {}
    for name in candidates:
        try:
            fn = _runner(op, name, args)
            for _ in range(3):
                fn()
            timer = _graph_timer(fn, device) if device.type == "cuda" else None
            if timer is None:  # not capturable: time eager calls
                timer = lambda: _time_ms(fn, device)  # noqa: E731
            times[name] = statistics.median(timer() for _ in range(repeats))
        except Exception:  # a backend that fails on this shape is simply not chosen
            continue
    del args
    return times


def _graph_timer(fn, device: torch.device, calls: int = 8):
    """A function returning the device milliseconds of one ``fn()`` replayed from a CUDA graph
    of ``calls`` back-to-back calls (how decoding runs it: no per-call launch cost on the
    host), or None when ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception:
        torch.cuda.synchronize(device)
        return None
    return lambda: _time_ms(graph.replay, device) / calls


def _time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def clear() -> None:
    """Forget every cached choice in memory (the disk file stays) and re-check backends."""
    global _DISK
    _CHOICES.clear()
    _DISK = None
    registry.clear()


def clear_disk() -> None:
    """Delete the on-disk cache file."""
    clear()
    try:
        os.remove(cache_path())
    except FileNotFoundError:
        pass
