"""What a plan draws: ``tome_sd``'s random destinations and ``metric_dim``'s projection.

The destinations are a pure function of ``(seed, timestep, block, window)`` hashed on the
device (no host read; a gradient-checkpoint recomputation draws them again exactly), or, with a
user ``generator``, drawn from it as ``tomesd`` draws them (one ``randint`` per block, kept on
the call)::

    dst = picks(call, config, index, (h // sy, w // sx), device)   # (h // sy, w // sx) int64
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..config import DiffusionConfig

if TYPE_CHECKING:
    from .core import Call

_M32 = 0xFFFFFFFF


def _mix(x: Any) -> Any:
    """A 32-bit integer hash of ``x`` in ``[0, 2**32)`` (int64 tensor or int; no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def call_key(call: Call, cfg: DiffusionConfig, device: torch.device) -> Tensor:
    """The call's ``(1,)`` int64 key on ``device``: a hash of ``seed`` and
    ``round(1000 * timestep)`` (first element), made on the device."""
    if call.key is None:
        t = call.timestep
        if isinstance(t, Tensor):
            t = (t.reshape(-1)[:1].float() * 1000).round().long()
        else:
            t = torch.full((1,), round(float(t or 0.0) * 1000), device=device)
        seed = cfg.seed or 0
        call.key = _mix((t.to(device) & _M32) ^ _mix((seed ^ (seed >> 32)) & _M32))
    return call.key


def picks(
    call: Call, cfg: DiffusionConfig, index: int, windows: tuple[int, ...], device: torch.device
) -> Tensor:
    """The destination of every window of block ``index``: ``(h // sy, w // sx)`` (a video:
    ``(t // st, h // sy, w // sx)``) int64 in ``[0, window size)``, a hash of the call's key,
    the block and the window; or, with a user ``generator``, drawn from it as ``tomesd`` does
    (once per block and call)."""
    size = cfg.sx * cfg.sy * ((cfg.st or 1) if len(windows) == 3 else 1)
    gen = cfg.generator
    if gen is not None:
        drawn = call.drawn.get(index)
        if drawn is None:
            drawn = torch.randint(size, (*windows, 1), generator=gen, device=gen.device)
            drawn = call.drawn[index] = drawn.to(device)
        return drawn.view(windows)
    key = _mix(call_key(call, cfg, device) ^ _mix(index + 1))
    j = torch.arange(math.prod(windows), device=device)
    return (_mix((key + j) & _M32) % size).view(windows)


_PROJECTIONS: dict[tuple[int, int, str, torch.dtype], Tensor] = {}


def metric_projection(c: int, d: int, like: Tensor) -> Tensor:
    """The fixed ``(c, d)`` Gaussian projection of ``metric_dim=d`` (seed 0, scaled by
    ``1 / sqrt(d)``): cosine similarities of projected tokens estimate those of the tokens
    (Johnson-Lindenstrauss), at ``c / d`` times less distance-matrix work."""
    key = (c, d, str(like.device), like.dtype)
    p = _PROJECTIONS.get(key)
    if p is None:
        g = torch.Generator().manual_seed(0)
        p = (torch.randn(c, d, generator=g) / math.sqrt(d)).to(like.device, like.dtype)
        _PROJECTIONS[key] = p
    return p
