"""Local tiles and padding masks: the *rows* that the methods cluster, and the way back.

A tiled or masked call of :func:`~atc_patch.kernel.cluster_tokens` is turned into rows: ``x``
``(R, L, C)`` features, ``valid`` ``(R, L)`` (which entries are real tokens of the row) and
``r`` ``(R,)`` merges per row. Every method clusters each row on its own (rows are the batch
dimension), and :meth:`Rows.write` turns the rows' local labels into one ``(B, N)`` plan.

Tiles. The ``N - protected`` tokens after the protected ones are a grid ``(h, w)`` or
``(t, h, w)`` in raster order; ``tile = (th, tw)`` / ``(tt, th, tw)`` (grid units) cuts it into
tiles in raster order of the tile grid, the last ones smaller where the grid does not divide
(ragged edges). A tile's tokens, in raster order, are one row (``L`` = the largest tile).

The ``r`` split (:func:`split_r`): tile ``t`` can remove at most ``cap_t`` tokens
(:func:`row_cap`: ``L_t - 1``; ToMe ``L_t // 2``; with a mask ``L_t - 2`` and ``(L_t - 1) // 2``).
``r`` (clamped to ``sum(cap_t)``) is split in proportion to the caps: tile ``t`` gets
``floor(r * cap_t / sum(cap))``, and the tokens left over go one each to the tiles with the
largest remainders ``r * cap_t mod sum(cap)``, ties to the earlier tile. The split depends on
shapes only, never on data, and no tile gets more than its cap.

Masks (``True`` = a real token, ``False`` = padding). Each tile becomes two rows, its real
tokens and its padding tokens, so the two never merge. Of a tile's ``r_t`` merges, the real
tokens receive ``min(r_t, cap(n_real))`` and the padding tokens the rest, which always fits
(that is why a masked row's cap reserves one slot for the padding). The real tokens' rows do
not read the padding tokens' values, so their partition does not depend on them. Output
slots: the protected tokens, then every real row's clusters (tile by tile), then every padding
row's, so a merged padding mask is again ``True`` first, then ``False``.

Example: a ``(6, 6)`` grid in ``(4, 4)`` tiles is 4 tiles of 16, 8, 8 and 4 tokens; ``r = 18``
with ATC's caps ``15, 7, 7, 3`` (sum 32) gives ``8, 4, 4, 2``
(``18 * 15 / 32 = 8.44``, ``3.94``, ``3.94``, ``1.69``: floors ``8, 3, 3, 1``, the three
tokens left go to the remainders ``.94, .94, .69``).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a grid: ``positions`` ``(T, L)`` grid indices (raster order inside each
    tile, ``-1`` past a ragged tile's end) and ``sizes`` ``(T,)`` real tokens per tile."""

    positions: np.ndarray
    sizes: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def length(self) -> int:
        return self.positions.shape[1]


@functools.lru_cache(maxsize=64)
def tile_grid(grid: tuple[int, ...], tile: tuple[int, ...] | None) -> TileGrid:
    """The tiles of ``grid`` (``(h, w)`` or ``(t, h, w)``) cut by ``tile`` (``None``: one)."""
    n = math.prod(grid)
    if tile is None:
        return TileGrid(np.arange(n)[None], (n,))
    index = np.arange(n).reshape(grid)
    starts = [range(0, g, s) for g, s in zip(grid, tile, strict=True)]
    tiles = []
    for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(grid)):
        block = index[tuple(slice(c, c + s) for c, s in zip(corner, tile, strict=True))]
        tiles.append(block.ravel())
    length = max(len(t) for t in tiles)
    positions = np.full((len(tiles), length), -1, dtype=np.int64)
    for i, t in enumerate(tiles):
        positions[i, : len(t)] = t
    return TileGrid(positions, tuple(len(t) for t in tiles))


def row_cap(method: str, n: int, masked: bool) -> int:
    """The most ``method`` removes from a row of ``n`` tokens (with a mask: for every split of
    the row into real and padding tokens, each merged only among themselves)."""
    if method == "tome":
        return max((n - 1) // 2, 0) if masked else n // 2
    return max(n - 2, 0) if masked else max(n - 1, 0)


def split_r(r: int, caps: Sequence[int]) -> list[int]:
    """``min(r, sum(caps))`` split over rows in proportion to ``caps``, largest remainders
    first (ties to the earlier row); no row gets more than its cap (module docstring)."""
    total = sum(caps)
    r = min(r, total)
    if total == 0:
        return [0] * len(caps)
    out = [r * c // total for c in caps]
    rem = [r * c % total for c in caps]
    for t in sorted(range(len(caps)), key=lambda t: (-rem[t], t))[: r - sum(out)]:
        out[t] += 1
    return out


@dataclass
class Rows:
    """Rows to cluster (see the module docstring) and how their labels go back.

    Attributes:
        x: ``(R, L, C)`` features; entries that are not real tokens of the row hold any token.
        valid: ``(R, L)`` bool, ``None`` when every entry is real.
        r: ``(R,)`` int64 merges per row, at most the row's cap.
        clusters: ``(R,)`` int64 clusters per row (real tokens minus ``r``).
        max_clusters: an upper bound of ``clusters`` (a Python int, for fixed shapes).
        target: ``(B, S * L)`` int64: the column of ``(B, N + 1)`` each entry is written to,
            ``N`` (a sink) for entries that are not real tokens; ``S = R / B`` rows per sample.
        offset: ``(R,)`` int64 first output slot of each row in its sample.
    """

    x: Tensor
    valid: Tensor | None
    r: Tensor
    clusters: Tensor
    max_clusters: int
    target: Tensor
    offset: Tensor

    def write(self, local: Tensor, num_tokens: int) -> Tensor:
        """``(B, N)`` labels from the rows' local labels ``(R, L)`` (each row's real tokens in
        ``[0, clusters)``); protected tokens keep slots ``0 .. protected-1``."""
        b, width = self.target.shape
        out = torch.arange(num_tokens + 1, device=local.device).repeat(b, 1)
        values = (local + self.offset[:, None]).view(b, width)
        return out.scatter_(1, self.target, values)[:, :num_tokens]


def build_rows(
    metric: Tensor,
    r: int,
    method: str,
    protected: int,
    grid: tuple[int, ...],
    tile: tuple[int, ...] | None,
    mask: Tensor | None,
) -> Rows:
    """The rows of a tiled and/or masked call (``r`` already clamped; see the module doc)."""
    b, n, c = metric.shape
    key = (b, n, r, method, protected, grid, tile, mask is not None)
    count, length, max_clusters, full = _static_ints(*key)

    def static(field: str) -> Tensor:
        return _static_tensor(field, *key, str(metric.device))

    x = metric[:, static("gather")].view(b, count, length, c)
    if mask is None:
        return Rows(
            x.view(-1, length, c),
            None if full else static("valid"),
            static("r"),
            static("clusters"),
            max_clusters,
            static("target"),
            static("offset"),
        )
    tile_valid, r_tile = static("tile_valid"), static("r_tile")
    real = mask[:, static("gather")].view(b, count, length).logical_and_(tile_valid)
    valid = torch.stack([real, real ^ tile_valid], dim=1)  # (B, 2, T, L): real, padding rows
    tokens = valid.sum(dim=3)  # (B, 2, T)
    # The real tokens' share: min(r_t, cap(real tokens)), tensors only (no host read).
    if method == "tome":
        cap = tokens[:, 0].div(2, rounding_mode="floor")
    else:
        cap = tokens[:, 0] - 1
    r_real = torch.clamp(cap, min=static("zeros"), max=r_tile)
    r_rows = torch.stack([r_real, r_tile - r_real], dim=1)  # the padding rows get the rest
    clusters = (tokens - r_rows).view(b, 2 * count)
    offset = clusters.cumsum(dim=1).sub_(clusters).add_(protected).view(-1)
    target = torch.where(valid, static("target_tile"), n).view(b, 2 * count * length)
    x = x[:, None].expand(b, 2, count, length, c).reshape(-1, length, c)
    return Rows(
        x, valid.view(-1, length), r_rows.view(-1), clusters.view(-1), max_clusters, target, offset
    )


@torch.compiler.assume_constant_result
def tile_sizes(grid: tuple[int, ...], tile: tuple[int, ...] | None) -> tuple[int, ...]:
    """Real tokens per tile (a constant under ``torch.compile``)."""
    return tile_grid(grid, tile).sizes


@functools.lru_cache(maxsize=64)
def _static_arrays(
    b: int,
    n: int,
    r: int,
    method: str,
    protected: int,
    grid: tuple[int, ...],
    tile: tuple[int, ...] | None,
    masked: bool,
) -> dict[str, Any]:
    """The shape-only parts of a call (numpy arrays, and ints under ``"ints"``)."""
    layout = tile_grid(grid, tile)
    pos = layout.positions
    real = pos >= 0
    r_tile = np.asarray(split_r(r, [row_cap(method, size, masked) for size in layout.sizes]))
    sizes = np.asarray(layout.sizes)
    clusters = sizes - r_tile
    target_tile = np.where(real, pos + protected, n)
    return {
        "ints": (layout.count, layout.length, int(max(np.maximum(clusters, 1))), bool(real.all())),
        "gather": np.where(real, pos + protected, 0).ravel(),  # (T * L,)
        "tile_valid": real,  # (T, L)
        "sizes": sizes,  # (T,)
        "r_tile": r_tile,  # (T,)
        "zeros": np.zeros_like(r_tile),  # (T,)
        "valid": np.tile(real, (b, 1)),  # (B * T, L)
        "r": np.tile(r_tile, b),  # (B * T,)
        "clusters": np.tile(clusters, b),  # (B * T,)
        "target": np.tile(target_tile.reshape(1, -1), (b, 1)),  # (B, T * L)
        "target_tile": target_tile,  # (T, L)
        "offset": np.tile(protected + np.cumsum(clusters) - clusters, b),  # (B * T,)
    }


@torch.compiler.assume_constant_result
def _static_ints(*key: Any) -> tuple[int, int, int, bool]:
    """``(tiles, row length, max clusters per row, every tile full)`` of a call."""
    return _static_arrays(*key)["ints"]


@torch.compiler.assume_constant_result
def _static_values(field: str, *key: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One shape-only array of a call as ``(values, shape)`` (a constant under compile)."""
    array = _static_arrays(*key)[field]
    return tuple(int(v) for v in array.ravel()), tuple(array.shape)


_TENSORS: OrderedDict[tuple, Tensor] = OrderedDict()
_TENSORS_KEPT = 256
_TENSORS_LOCK = threading.Lock()


def _static_tensor(field: str, *key: Any) -> Tensor:
    """One shape-only tensor of a call on the device ``key[-1]``. In eager mode it is built
    once per call signature and device and kept, so a later call copies nothing to the
    device; under ``torch.compile`` it is a constant of the graph."""
    dtype = torch.bool if field in ("valid", "tile_valid") else torch.long
    if torch.compiler.is_compiling():
        values, shape = _static_values(field, *key[:-1])
        return torch.tensor(values, dtype=dtype, device=key[-1]).view(shape)
    with _TENSORS_LOCK:  # (threads and replicas share the cache)
        out = _TENSORS.get((field, *key))
        if out is not None:
            _TENSORS.move_to_end((field, *key))
            return out
    array = np.ascontiguousarray(_static_arrays(*key[:-1])[field])
    out = torch.tensor(array, dtype=dtype, device=key[-1])
    with _TENSORS_LOCK:
        _TENSORS[(field, *key)] = out
        if len(_TENSORS) > _TENSORS_KEPT:
            _TENSORS.popitem(last=False)
    return out
