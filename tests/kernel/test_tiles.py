"""Tiled clustering (``grid=``, ``tile=``): the r split rule, ragged tiles, ATC exact per tile
against scipy, the other methods against their definitions per tile, one plan over the whole
input, ``torch.compile(fullgraph=True)``; ToMe-SD's 3-D windows against a direct reference."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import same_partition
from tomesd.merge import bipartite_soft_matching_random2d

import atc_patch
from atc_patch.kernel import max_reduction
from atc_patch.kernel.tiles import split_r, tile_grid

from .test_atc import scipy_cuts

LINKAGES = ["single", "complete", "average"]


def tiles_of(grid: tuple[int, ...], tile: tuple[int, ...]) -> list[list[int]]:
    """Reference tiling: grid indices of each tile (raster order of tiles and inside them)."""
    grid3, tile3 = (1,) * (3 - len(grid)) + grid, (1,) * (3 - len(tile)) + tile
    out = []
    for t0, y0, x0 in itertools.product(*(range(0, g, s) for g, s in zip(grid3, tile3))):
        out.append(
            [
                (t * grid3[1] + y) * grid3[2] + x
                for t in range(t0, min(t0 + tile3[0], grid3[0]))
                for y in range(y0, min(y0 + tile3[1], grid3[1]))
                for x in range(x0, min(x0 + tile3[2], grid3[2]))
            ]
        )
    return out


def reference_split(r: int, caps: list[int]) -> list[int]:
    """The stated rule, written out: floors of r * cap / sum, then largest remainders."""
    total = sum(caps)
    r = min(r, total)
    exact = [Fraction(r * c, total) if total else Fraction(0) for c in caps]
    out = [math.floor(e) for e in exact]
    left = r - sum(out)
    by_remainder = sorted(range(len(caps)), key=lambda t: (-(exact[t] - out[t]), t))
    for t in by_remainder[:left]:
        out[t] += 1
    return out


def test_split_rule() -> None:
    assert split_r(18, [15, 7, 7, 3]) == [8, 4, 4, 2]  # the module docstring's example
    assert split_r(100, [3, 3]) == [3, 3]  # clamped to the caps
    assert split_r(5, [0, 4, 4]) == [0, 3, 2]  # ties to the earlier tile
    gen = np.random.default_rng(0)
    for _ in range(300):
        caps = gen.integers(0, 40, size=gen.integers(1, 12)).tolist()
        r = int(gen.integers(0, sum(caps) + 5))
        got = split_r(r, caps)
        assert got == reference_split(r, caps)
        assert sum(got) == min(r, sum(caps)) and all(0 <= g <= c for g, c in zip(got, caps))


@pytest.mark.parametrize(
    ("grid", "tile"), [((5, 7), (2, 3)), ((4, 4), (4, 4)), ((3, 5, 6), (2, 2, 4)), ((6, 6), (9, 2))]
)
def test_tile_grid_layout(grid: tuple, tile: tuple) -> None:
    layout = tile_grid(grid, tile)
    want = tiles_of(grid, tile)
    assert layout.sizes == tuple(len(t) for t in want)
    for row, tokens in zip(layout.positions, want):
        assert row[: len(tokens)].tolist() == tokens and (row[len(tokens) :] == -1).all()


def tile_rs(method: str, r: int, grid: tuple, tile: tuple, masked: bool = False) -> list[int]:
    sizes = [len(t) for t in tiles_of(grid, tile)]
    if method == "tome":
        caps = [(s - 1) // 2 if masked else s // 2 for s in sizes]
    else:
        caps = [max(s - 2, 0) if masked else s - 1 for s in sizes]
    return reference_split(r, caps)


TILED = [
    ((6, 6), (4, 4), 0),  # ragged: 16, 8, 8, 4 tokens
    ((7, 9), (3, 4), 1),  # ragged both ways, a class token
    ((2, 5, 6), (2, 2, 4), 2),  # video: frames x height x width
    ((8, 8), (8, 8), 0),  # one tile: the whole grid
]


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize(("grid", "tile", "protected"), TILED)
def test_tiled_atc_matches_scipy_per_tile(grid, tile, protected, linkage: str) -> None:
    tiles = tiles_of(grid, tile)
    n = protected + math.prod(grid)
    metric = torch.randn(2, n, 12, dtype=torch.float64)
    cap = max_reduction("atc", n, protected, grid=grid, tile=tile)
    assert cap == sum(len(t) - 1 for t in tiles)
    for r in (1, n // 3, cap - 1, cap, cap + 7):
        plan = atc_patch.cluster_tokens(
            metric, r, linkage=linkage, protected=protected, grid=grid, tile=tile, backend="torch"
        )
        r_tiles = tile_rs("atc", r, grid, tile)
        assert plan.num_out == n - min(r, cap)
        labels = plan.labels
        assert torch.equal(labels[:, :protected], torch.arange(protected).expand(2, protected))
        for i in range(2):
            seen: set[int] = set()
            for tokens, r_t in zip(tiles, r_tiles):
                pos = torch.tensor(tokens) + protected
                got = labels[i, pos]
                assert not seen & set(got.tolist())  # no cluster spans two tiles
                seen |= set(got.tolist())
                if len(tokens) > 1:
                    ref = scipy_cuts(metric[i, pos], linkage, [len(tokens) - r_t])[:, 0]
                    assert same_partition(got, ref), (grid, tile, r, i)
            assert seen == set(range(protected, plan.num_out))


def test_tiled_slots_follow_the_tiles() -> None:
    """Slots: the protected tokens, then tile by tile, each tile's clusters by smallest token."""
    grid, tile = (6, 7), (3, 3)
    metric = torch.randn(2, 1 + 42, 8)
    plan = atc_patch.cluster_tokens(metric, 15, protected=1, grid=grid, tile=tile)
    for row in plan.labels:
        last = 0
        for tokens in tiles_of(grid, tile):
            got = row[torch.tensor(tokens) + 1].tolist()
            firsts = sorted({s: k for k, s in reversed(list(enumerate(got)))}.items())
            assert [s for s, _ in firsts] == list(range(last + 1, last + 1 + len(firsts)))
            assert [k for _, k in firsts] == sorted(k for _, k in firsts)
            last += len(firsts)


def tome_reference(x: torch.Tensor, r: int) -> list[int]:
    """ToMe's matching on one tile ``(L, C)``: A = even places, B = odd; returns roots."""
    u = x / x.norm(dim=-1, keepdim=True)
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    root = list(range(len(x)))
    if not b:
        return root
    scores = u[a] @ u[b].T
    best, dst = scores.max(dim=1)
    for k in best.argsort(descending=True)[:r].tolist():
        root[a[k]] = b[int(dst[k])]
    return root


@pytest.mark.parametrize(("grid", "tile", "protected"), TILED)
def test_tiled_tome_matches_tome_per_tile(grid, tile, protected) -> None:
    tiles = tiles_of(grid, tile)
    n = protected + math.prod(grid)
    metric = torch.randn(2, n, 12)
    r = n // 3
    plan = atc_patch.cluster_tokens(
        metric, r, method="tome", protected=protected, grid=grid, tile=tile
    )
    r_tiles = tile_rs("tome", r, grid, tile)
    assert plan.num_out == n - sum(r_tiles)
    for i in range(2):
        for tokens, r_t in zip(tiles, r_tiles):
            pos = torch.tensor(tokens) + protected
            ref = tome_reference(metric[i, pos], r_t)
            assert same_partition(plan.labels[i, pos], ref)


@pytest.mark.parametrize("method", ["kmedoids", "dpcknn"])
@pytest.mark.parametrize(("grid", "tile", "protected"), TILED)
def test_tiled_centres_equal_the_method_on_each_tile(method, grid, tile, protected) -> None:
    """Each tile's partition is the method's own on that tile's tokens alone, with its r."""
    tiles = tiles_of(grid, tile)
    n = protected + math.prod(grid)
    metric = torch.randn(2, n, 12)
    r = n // 3
    plan = atc_patch.cluster_tokens(metric, r, method, protected=protected, grid=grid, tile=tile)
    for tokens, r_t in zip(tiles, tile_rs(method, r, grid, tile)):
        pos = torch.tensor(tokens) + protected
        alone = atc_patch.cluster_tokens(metric[:, pos], r_t, method).labels
        for i in range(2):
            assert same_partition(plan.labels[i, pos], alone[i]), (grid, tile, tokens)


@pytest.mark.parametrize("method", ["atc", "kmedoids", "dpcknn"])
def test_one_tile_equals_no_tile(method: str) -> None:
    """A tile as large as the grid is today's call: the same labels."""
    metric = torch.randn(3, 1 + 48, 8)
    plain = atc_patch.cluster_tokens(metric, 20, method, protected=1)
    tiled = atc_patch.cluster_tokens(metric, 20, method, protected=1, grid=(6, 8), tile=(6, 8))
    assert torch.equal(plain.labels, tiled.labels)
    assert torch.equal(
        plain.labels, atc_patch.cluster_tokens(metric, 20, method, protected=1, grid=(6, 8)).labels
    )


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_tiled_plan_merges_and_unmerges(method: str) -> None:
    metric = torch.randn(2, 1 + 35, 8)
    plan = atc_patch.cluster_tokens(metric, 12, method, protected=1, grid=(5, 7), tile=(2, 3))
    x = torch.randn(2, 36, 4)
    merged, size = plan.merge_wavg(x)
    assert merged.shape == (2, 36 - 12, 4) and torch.equal(
        size.sum(dim=1), torch.full((2, 1), 36.0)
    )
    assert plan.unmerge(merged).shape == (2, 36, 4)
    atc_patch.MergePlan(plan.labels, plan.num_out, validate=True)  # every slot used


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids", "dpcknn"])
def test_tiled_call_compiles_fullgraph(method: str) -> None:
    torch._dynamo.reset()
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def labels(metric: torch.Tensor) -> torch.Tensor:
        kw = {"protected": 1, "grid": (7, 9), "tile": (4, 4)}
        return atc_patch.cluster_tokens(metric, 20, method, **kw).labels

    metric = torch.randn(2, 64, 8)
    compiled = torch.compile(labels, backend=capture, fullgraph=True)
    assert torch.equal(compiled(metric), labels(metric))
    assert torch.equal(compiled(metric.flip(0)), labels(metric.flip(0)))  # new data, same graph
    assert len(graphs) == 1
    if method == "atc":
        targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
        assert any("atc_patch.atc_labels" in t for t in targets), targets


# --- ToMe-SD: the grid argument and 3-D windows ------------------------------------------------


def tome_sd_reference(
    metric: torch.Tensor, r: int, grid: tuple, window: tuple, gen: torch.Generator | None
) -> list[list[int]]:
    """ToMe-SD from its definition (Bolya & Hoffman 2023, sec. 3.3), for one sample ``(N, C)``:
    one destination per ``st x sy x sx`` window (window-local raster index drawn as
    ``randint(st*sy*sx, (t//st, h//sy, w//sx, 1))``, or 0), every other token a source;
    each source's most similar destination; the ``r`` best sources merge. Returns roots."""
    (t, h, w), (st, sy, sx) = grid, window
    nt, ny, nx = t // st, h // sy, w // sx
    if gen is None:
        pick = torch.zeros(nt, ny, nx, 1, dtype=torch.long)
    else:
        pick = torch.randint(st * sy * sx, (nt, ny, nx, 1), generator=gen)
    dst = []
    for it, iy, ix in itertools.product(range(nt), range(ny), range(nx)):
        dt, rest = divmod(int(pick[it, iy, ix, 0]), sy * sx)
        dy, dx = divmod(rest, sx)
        dst.append(((it * st + dt) * h + iy * sy + dy) * w + ix * sx + dx)
    src = [k for k in range(t * h * w) if k not in set(dst)]
    u = metric / metric.norm(dim=-1, keepdim=True)
    best, which = (u[src] @ u[dst].T).max(dim=1)
    root = list(range(t * h * w))
    for k in best.argsort(descending=True)[: min(r, len(src))].tolist():
        root[src[k]] = dst[int(which[k])]
    return root


@pytest.mark.parametrize(
    ("grid", "window"),
    [
        ((2, 6, 8), (2, 2, 2)),
        ((3, 5, 7), (2, 2, 3)),
        ((4, 4, 4), (1, 2, 2)),
        ((1, 6, 6), (1, 3, 2)),
    ],
)
@pytest.mark.parametrize("no_rand", [True, False])
def test_tome_sd_3d_matches_its_definition(grid: tuple, window: tuple, no_rand: bool) -> None:
    n = math.prod(grid)
    metric = torch.randn(2, n, 16)
    r = n // 2
    st, sy, sx = window
    plan = atc_patch.cluster_tokens(
        metric,
        r,
        "tome_sd",
        grid=grid,
        st=st,
        sy=sy,
        sx=sx,
        no_rand=no_rand,
        generator=None if no_rand else torch.Generator().manual_seed(3),
    )
    gen = None if no_rand else torch.Generator().manual_seed(3)
    for i in range(2):
        ref = tome_sd_reference(metric[i], r, grid, window, gen)
        if gen is not None:  # the draw is shared by the batch: draw again for the next sample
            gen = torch.Generator().manual_seed(3)
        assert same_partition(plan.labels[i], ref), (grid, window)
    windows = math.prod(g // s for g, s in zip(grid, window))
    assert plan.num_out == n - min(r, n - windows)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (7, 9)])
def test_tome_sd_2d_grid_forms_match_tomesd(h: int, w: int) -> None:
    """``grid=(h, w)``, ``h=, w=`` and ``grid=(1, h, w)`` with ``st=1`` are tomesd's function."""
    metric = torch.randn(2, h * w, 16)
    x = torch.randn(2, h * w, 8)
    r = h * w // 2
    merge, _ = bipartite_soft_matching_random2d(
        metric, w, h, 2, 2, r, no_rand=False, generator=torch.Generator().manual_seed(5)
    )
    want = merge(x)
    for kw in ({"h": h, "w": w}, {"grid": (h, w)}, {"grid": (1, h, w), "st": 1}):
        gen = torch.Generator().manual_seed(5)
        plan = atc_patch.cluster_tokens(metric, r, "tome_sd", generator=gen, **kw)
        torch.testing.assert_close(plan.merge(x), want)
