"""Reusable scratch memory of the clustering kernel, per thread, on the CPU.

ATC works in an ``(B, N+1, W)`` distance matrix and a few row buffers of similar size. A fresh
multi-megabyte CPU tensor costs a page fault per 4 KiB page on first touch (glibc hands large
blocks back to the OS on free), and on a 4096-token Stable Diffusion level that was a quarter
of the kernel's time. So on the CPU the kernel keeps its buffers between calls, one set per
thread (concurrent calls never share one), growing to the largest size seen, much as PyTorch's
caching allocator does on CUDA (on other devices :func:`scratch` simply allocates).

What is kept is bounded (:func:`set_workspace_limits`): at most ``max_threads`` threads keep
buffers (8 by default) and, if set, ``max_bytes`` in all. When a thread's buffers grow past a
limit, the least recently used *other* threads' buffers are dropped (they are re-created by
those threads' next call); when a kernel call returns (:func:`call_scope`), the limits are
enforced once more with the caller's own buffers included (least recently used first, the
caller's last), so ``max_bytes`` bounds what stays between calls, in a single-threaded
program too (``max_bytes=0``: nothing stays). A thread's buffers go when the thread ends.
:func:`release_workspace` frees every thread's buffers (or only the caller's). A buffer that a
call in flight is using is freed when that call returns: dropping it never disturbs the call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "call_scope",
    "release_workspace",
    "scratch",
    "set_workspace_limits",
    "workspace_bytes",
]


class _Workspace:
    """One thread's buffers: ``(name, dtype) -> 1-D tensor``, and when they were last used."""

    __slots__ = ("__weakref__", "buffers", "last_used")

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self.last_used = 0

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in list(self.buffers.values()))


_local = threading.local()  # .ws: this thread's _Workspace; .depth: nested kernel calls
_lock = threading.Lock()  # guards _all and _limits (taken only when a buffer grows or on release)
_all: weakref.WeakSet[_Workspace] = weakref.WeakSet()  # every live thread's workspace
_clock = itertools.count(1)
_limits = {"max_threads": 8, "max_bytes": None}


def _mine() -> _Workspace:
    ws = getattr(_local, "ws", None)
    if ws is None:
        ws = _local.ws = _Workspace()
        with _lock:
            _all.add(ws)
    return ws


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, reusing this thread's buffer ``name``.

    Two live tensors must use different names. The buffer is reused by the next call that asks
    for ``name``: results returned to callers must never be views of it.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    ws = _mine()
    ws.last_used = next(_clock)
    buffers = ws.buffers  # a release from another thread swaps the dict, never edits this one
    numel = math.prod(shape)
    key = (name, dtype)
    old = buffers.get(key)
    if old is None or old.numel() < numel:
        buffers.pop(key, None)
        del old  # free the old one before allocating the new one
        with torch.inference_mode(False):  # a normal tensor, writable in and out of that mode
            buffers[key] = torch.empty(numel, dtype=dtype)
        _enforce_limits(ws)
    return buffers[key][:numel].view(shape)


def _enforce_limits(grown: _Workspace | None) -> None:
    """Drop the least recently used threads' buffers until the limits hold.

    ``grown`` (the thread whose call is using its buffers) is never dropped; ``None`` (a call
    has returned): every thread's buffers may be dropped, the least recently used first.
    """
    with _lock:
        max_threads, max_bytes = _limits["max_threads"], _limits["max_bytes"]
        holding = [ws for ws in _all if ws.buffers]
        others = sorted((ws for ws in holding if ws is not grown), key=lambda ws: ws.last_used)
        total = sum(ws.nbytes() for ws in holding) if max_bytes is not None else 0
        count = len(holding)
        for ws in others:
            over_count = max_threads is not None and count > max_threads
            over_bytes = max_bytes is not None and total > max_bytes
            if not (over_count or over_bytes):
                break
            total -= ws.nbytes() if max_bytes is not None else 0
            ws.buffers = {}
            count -= 1


@contextlib.contextmanager
def call_scope() -> Iterator[None]:
    """Mark one kernel call (nesting allowed): when the outermost call of this thread returns,
    the limits are enforced with its own buffers included (:func:`set_workspace_limits`)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        ws = getattr(_local, "ws", None)
        if depth == 0 and ws is not None and ws.buffers and _limits["max_bytes"] is not None:
            _enforce_limits(None)  # (thread counts are enforced when buffers grow)


def set_workspace_limits(
    max_threads: int | None = 8, max_bytes: int | None = None
) -> dict[str, int | None]:
    """Bound the kernel buffers kept between calls (CPU). Returns the previous limits.

    Args:
        max_threads: at most this many threads keep buffers (``None``: no limit).
        max_bytes: at most this many bytes in all threads (``None``: no limit). A call in
            flight always gets what it needs, even beyond ``max_bytes``; when it returns, what
            is kept is brought back under ``max_bytes`` (``0``: nothing is kept between calls).

    Raises:
        ValueError: a limit that is not ``None`` or an int >= 1 (``max_bytes`` >= 0).
    """
    for name, value, low in (("max_threads", max_threads, 1), ("max_bytes", max_bytes, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")
        if value is not None and value < low:
            raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")
    with _lock:
        previous = dict(_limits)
        _limits.update(max_threads=max_threads, max_bytes=max_bytes)
    in_call = getattr(_local, "depth", 0) > 0  # (then this thread's buffers are in use)
    _enforce_limits(_mine() if in_call else None)
    return previous


def release_workspace(all_threads: bool = True) -> None:
    """Free the kernel's CPU buffers (they are re-created by the next call that needs them).

    Args:
        all_threads: free every thread's buffers (default), or only the calling thread's.
            Buffers that a call in flight in another thread is using are freed when it returns.
    """
    if not all_threads:
        ws = getattr(_local, "ws", None)
        if ws is not None:
            ws.buffers = {}
        return
    with _lock:
        for ws in list(_all):
            ws.buffers = {}


def workspace_bytes(all_threads: bool = False) -> int:
    """Bytes the kernel's CPU buffers hold: the calling thread's, or every thread's."""
    if all_threads:
        with _lock:
            return sum(ws.nbytes() for ws in list(_all))
    ws = getattr(_local, "ws", None)
    return 0 if ws is None else ws.nbytes()
