"""Reusable scratch memory of the clustering kernel, per thread, on the CPU.

ATC works in an ``(B, N+1, W)`` distance matrix and a few row buffers of similar size. A fresh
multi-megabyte CPU tensor costs a page fault per 4 KiB page on first touch (glibc hands large
blocks back to the OS on free), and on a 4096-token Stable Diffusion level that was a quarter
of the kernel's time. So on the CPU the kernel keeps its buffers between calls, one set per
thread, growing to the largest size seen, much as PyTorch's caching allocator does on CUDA (on
other devices :func:`scratch` simply allocates). :func:`release_workspace` frees them.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, reusing this thread's buffer ``name``.

    Two live tensors must use different names. The buffer is reused by the next call that asks
    for ``name``: results returned to callers must never be views of it.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers: dict = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    key = (name, dtype)
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)  # free the old one before allocating the new one
        with torch.inference_mode(False):  # a normal tensor, writable in and out of that mode
            buffers[key] = torch.empty(numel, dtype=dtype)
    return buffers[key][:numel].view(shape)


def release_workspace() -> None:
    """Free the calling thread's kernel buffers (they are re-created on the next call)."""
    _local.__dict__.pop("buffers", None)


def workspace_bytes() -> int:
    """Bytes the calling thread's kernel buffers hold."""
    buffers = _local.__dict__.get("buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values())
