"""Argument checking of :func:`~atc_patch.kernel.cluster_tokens`: every bad argument is a
``ValueError`` that names it, what it got and what is accepted, before any work is done.

Numbers follow the API's one rule (:func:`atc_patch._validate.as_int`): an int, a numpy
integer, a 0-d integer tensor (reading it is a host synchronisation) or an integral float.
An option that belongs to another method is an error, not silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atc_patch._validate import as_int  # absolute: the kernel package also loads standalone

from .atc import LINKAGES
from .ops import BACKENDS

METHODS = ("atc", "tome", "tome_sd", "kmedoids", "dpcknn")

# Options of one method only: (name, method, the value that means "not given").
_METHOD_OPTIONS = (
    ("linkage", "atc", None),
    ("h", "tome_sd", None),
    ("w", "tome_sd", None),
    ("sx", "tome_sd", None),
    ("sy", "tome_sd", None),
    ("st", "tome_sd", None),
    ("no_rand", "tome_sd", False),
    ("generator", "tome_sd", None),
    ("pick", "tome_sd", None),
    ("k", "dpcknn", None),
    ("iters", "kmedoids", None),
)


@dataclass(frozen=True)
class Call:
    """A checked call: ints are Python ints, ``grid`` a tuple (``None`` if not given),
    ``window`` ToMe-SD's ``(st, sy, sx)`` (3-D, with ``grid`` made 3-D for it)."""

    method: str
    r: int
    protected: int
    grid: tuple[int, ...] | None
    tile: tuple[int, ...] | None
    mask: Tensor | None
    linkage: str
    window: tuple[int, int, int]
    no_rand: bool
    generator: torch.Generator | None
    pick: Tensor | None
    k: int
    iters: int
    backend: str


def check_call(metric: Tensor, r: Any, method: str, protected: Any, **opts: Any) -> Call:
    """Check a call of ``cluster_tokens`` (``opts``: its keyword arguments)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, owner, unset in _METHOD_OPTIONS:
        value = opts[name]
        given = value is not unset if unset is None else value != unset
        if given and method != owner:
            raise ValueError(f"{name} applies to method={owner!r} only, not to {method!r}")
    if opts["linkage"] is not None and opts["linkage"] not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {opts['linkage']!r}")
    backend = opts["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and method != "atc":
        raise ValueError(f"backend='triton' applies to method='atc' only, not to {method!r}")
    if not isinstance(metric, Tensor) or metric.dim() != 3:
        shape = tuple(metric.shape) if isinstance(metric, Tensor) else type(metric).__name__
        raise ValueError(f"metric must be a (B, N, C) tensor, got {shape}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")
    b, n, _ = metric.shape
    r = as_int("r", r)
    if r < 0:
        raise ValueError(f"r must be >= 0 (tokens removed), got {r}")
    protected = as_int("protected", protected, minimum=0)
    if protected > n:
        raise ValueError(f"protected={protected} exceeds the {n} tokens in metric")
    if method == "tome_sd" and protected:
        raise ValueError("method='tome_sd' merges a full token grid; use protected=0")
    grid = _check_grid(method, n - protected, opts)
    tile = _check_tile(method, grid, opts["tile"])
    mask = _check_mask(method, metric, opts["mask"])
    window = (1, 1, 1)
    if method == "tome_sd":
        sx, sy, st = (opts[v] for v in ("sx", "sy", "st"))
        sx = 2 if sx is None else as_int("sx", sx, minimum=1)
        sy = 2 if sy is None else as_int("sy", sy, minimum=1)
        st = 1 if st is None else as_int("st", st, minimum=1)
        if len(grid) == 2 and st != 1:
            raise ValueError(f"st (the window's frames) needs a 3-D grid=(t, h, w), got {grid}")
        window, grid = (st, sy, sx), (1, *grid) if len(grid) == 2 else grid
    k, iters = opts["k"], opts["iters"]
    return Call(
        method=method,
        r=r,
        protected=protected,
        grid=grid,
        tile=tile,
        mask=mask,
        linkage=opts["linkage"] or "average",
        window=window,
        no_rand=bool(opts["no_rand"]),
        generator=opts["generator"],
        pick=_check_pick(opts["pick"], grid, window, opts["generator"]),
        k=5 if k is None else as_int("k", k, minimum=1),
        iters=10 if iters is None else as_int("iters", iters, minimum=1),
        backend=backend,
    )


def _check_pick(
    pick: Any, grid: tuple[int, ...] | None, window: tuple[int, int, int], generator: Any
) -> Tensor | None:
    """ToMe-SD's given destinations: an integer tensor of one entry per whole window."""
    if pick is None:
        return None
    if generator is not None:
        raise ValueError("give pick (the destinations) or generator (to draw them), not both")
    windows = 1
    for g, s in zip(grid, window, strict=True):
        windows *= g // s
    if not isinstance(pick, Tensor) or pick.is_floating_point() or pick.numel() != windows:
        raise ValueError(
            f"pick must be an integer tensor with one entry per window ({windows}), got "
            f"{tuple(pick.shape) if isinstance(pick, Tensor) else type(pick).__name__}"
        )
    return pick


def _check_grid(method: str, free: int, opts: dict) -> tuple[int, ...] | None:
    """``grid`` (or ToMe-SD's ``h``, ``w``) as a tuple whose product is ``free``."""
    grid, h, w = opts["grid"], opts["h"], opts["w"]
    if h is not None or w is not None:
        if grid is not None:
            raise ValueError("give the token grid as grid=(h, w) or as h=, w=, not both")
        if h is None or w is None:
            raise ValueError("method='tome_sd' needs the token grid: give both h and w")
        grid = (h, w)
    if grid is None:
        if method == "tome_sd":
            raise ValueError(
                "method='tome_sd' needs the token grid: grid=(h, w) or (t, h, w), or h=, w="
            )
        return None
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) not in (2, 3):
        raise ValueError(f"grid must be (h, w) or (t, h, w), got {grid!r}")
    grid = tuple(as_int(f"grid[{i}]", g, minimum=1) for i, g in enumerate(grid))
    if math.prod(grid) != free:
        what = " x ".join(map(str, grid))
        raise ValueError(
            f"grid {what} = {math.prod(grid)} tokens, but metric has {free} tokens after the "
            "protected ones (the grid holds the tokens after them, in raster order)"
        )
    return grid


def _check_tile(method: str, grid: tuple[int, ...] | None, tile: Any) -> tuple[int, ...] | None:
    if tile is None:
        return None
    if method == "tome_sd":
        raise ValueError(
            "method='tome_sd' takes no tile: it is local already (one destination per "
            "sx x sy (x st) window); use sx, sy, st"
        )
    if grid is None:
        raise ValueError("tile needs the token grid: pass grid=(h, w) or (t, h, w) too")
    if isinstance(tile, (str, bytes)) or not hasattr(tile, "__len__") or len(tile) != len(grid):
        raise ValueError(f"tile must have one size per grid axis ({len(grid)}), got {tile!r}")
    return tuple(as_int(f"tile[{i}]", t, minimum=1) for i, t in enumerate(tile))


def _check_mask(method: str, metric: Tensor, mask: Any) -> Tensor | None:
    """``mask`` as a ``(B, N)`` bool tensor on ``metric``'s device (integers: nonzero = real)."""
    if mask is None:
        return None
    if method == "tome_sd":
        raise ValueError(
            "method='tome_sd' takes no mask: its destinations are fixed grid positions; use "
            "method='tome' or 'atc' for padded inputs"
        )
    b, n, _ = metric.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (b, n):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, N) = {(b, n)} bool tensor, got {shape}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(
            f"mask must be bool (True = a real token) or integer (nonzero = real), got "
            f"{mask.dtype}; an additive attention mask is not a token mask"
        )
    if mask.device != metric.device:
        raise ValueError(f"mask is on {mask.device}, metric on {metric.device}")
    return mask if mask.dtype == torch.bool else mask != 0
