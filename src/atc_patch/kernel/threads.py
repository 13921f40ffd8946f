"""Intra-op threads of the kernel's CPU calls, kept to one on an oversubscribed machine.

The kernel's rounds are many small operations (``(B, N)``-sized state, a few row blocks), and
each one that passes torch's grain size opens an OpenMP parallel region: every thread of the
pool must run its share before the operation returns. When another process keeps a core busy,
the pool's second thread waits for a scheduler time slice at *every* region, and a 20 ms call
(B = 64, N = 196) took 0.5-0.7 s with torch's default 2 threads against ~25 ms with one.

So, by default (policy ``"auto"``), a kernel call on CPU tensors first looks whether the machine
is oversubscribed -- more runnable threads outside this process, plus torch's intra-op threads,
than CPUs (``/proc/loadavg`` and this process's running threads, read at most every 0.25 s) --
and if so runs with **one intra-op thread for the calling thread only**: OpenMP's thread count
is a per-thread setting (``omp_set_num_threads`` acts on the calling thread's ICV), so other
Python threads and torch's global setting (``torch.set_num_threads``) are untouched, and the
value is restored when the call returns, also on an exception. A quiet machine runs exactly as
before. Policies (:func:`set_kernel_threads`): ``"auto"``, ``"torch"`` (always torch's setting),
or an int ``n`` (at most ``n`` threads, busy or not).

Where the check or the per-thread setting is unavailable (no ``/proc``: not Linux; a torch
whose parallel backend is not OpenMP), ``"auto"`` and ``n`` leave torch's setting alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["get_kernel_threads", "kernel_threads", "set_kernel_threads", "with_kernel_threads"]

_POLICIES = ("auto", "torch")
_policy: str | int = "auto"
_CHECK_EVERY_S = 0.25
_busy_cache = [-1.0, False]  # (time of the last check, result); a race only re-checks
_F = TypeVar("_F", bound=Callable[..., Any])


def set_kernel_threads(policy: str | int = "auto") -> str | int:
    """Choose how many intra-op threads the kernel's CPU calls use. Returns the previous policy.

    Args:
        policy: ``"auto"`` (default): one thread while the machine is oversubscribed, torch's
            setting otherwise; ``"torch"``: always torch's setting (``torch.get_num_threads()``);
            an int ``n >= 1``: at most ``n`` (never more than torch's setting).

    Raises:
        ValueError: any other value.
    """
    global _policy
    if isinstance(policy, str):
        ok = policy in _POLICIES
    else:
        ok = isinstance(policy, int) and not isinstance(policy, bool) and policy >= 1
    if not ok:
        raise ValueError(f"policy must be one of {_POLICIES} or an int >= 1, got {policy!r}")
    previous, _policy = _policy, policy
    return previous


def get_kernel_threads() -> str | int:
    """The current policy (see :func:`set_kernel_threads`)."""
    return _policy


@functools.cache
def _omp() -> Any | None:
    """A ctypes handle on the OpenMP runtime torch runs on (libgomp / libomp), or ``None``."""
    if "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1]:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1"))}
    except OSError:
        return None
    names = ("libgomp", "libomp", "libiomp5")
    omp = next((p for p in sorted(paths) if os.path.basename(p).startswith(names)), None)
    if omp is None:
        return None
    try:
        lib = ctypes.CDLL(omp)
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        lib.omp_set_num_threads.restype = None
    except (OSError, AttributeError):
        return None
    return lib


def _running_outside() -> int | None:
    """Runnable threads on the machine that are not this process's, or ``None`` if unknown."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
                ours += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return running - ours


def oversubscribed(threads: int) -> bool:
    """True when threads outside this process plus ``threads`` exceed the CPUs (cached 0.25 s)."""
    now = time.monotonic()
    checked, busy = _busy_cache
    if now - checked < _CHECK_EVERY_S:
        return busy
    outside = _running_outside()
    busy = outside is not None and outside + threads > (os.cpu_count() or 1)
    _busy_cache[:] = [now, busy]
    return busy


def _wanted(threads: int) -> int:
    """Intra-op threads for a kernel call, given torch's ``threads`` for the calling thread."""
    if _policy == "torch" or threads <= 1:
        return threads
    if _policy == "auto":
        return 1 if oversubscribed(threads) else threads
    return min(int(_policy), threads)


@contextlib.contextmanager
def kernel_threads(device: torch.device | str) -> Iterator[None]:
    """Run the block with the kernel's intra-op threads (see the module docstring).

    Acts on CPU work only and on the calling thread only; restores its setting on exit.
    """
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():  # not in a graph
        yield
        return
    threads = torch.get_num_threads()  # also lets torch set up this thread's pool first
    n = _wanted(threads)
    omp = _omp() if n < threads else None
    if omp is None:
        yield
        return
    omp.omp_set_num_threads(n)
    try:
        yield
    finally:
        omp.omp_set_num_threads(threads)


def with_kernel_threads(fn: _F) -> _F:
    """Decorate a kernel entry point whose first argument is a tensor (or has ``.d``, a
    workspace) so that it runs under :func:`kernel_threads` on that tensor's device."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        device = first.device if isinstance(first, torch.Tensor) else first.d.device
        with kernel_threads(device):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
