"""What one ``cluster_tokens`` call costs a GPU, counted on the CPU: kernel launches and host
synchronisations per method, path and size.

A ``TorchDispatchMode`` sees every aten op a call issues and treats the CPU tensors as if
they were on a GPU:

* a *launch* is an op that runs a kernel (views, reshapes and allocations are not);
* a *host sync* is an op whose result the host must read (``aten._local_scalar_dense``, behind
  ``.item()``, ``int()``, ``bool()``; ``nonzero``, ``masked_select``, ``unique``, ``x[mask]``
  and other ops with data-dependent output shapes), plus the host reads the dispatcher does
  not always see on the CPU (``Tensor.tolist()`` / ``.numpy()``; ``int()`` / ``float()`` /
  ``.item()`` under ``torch.inference_mode``), counted by wrapping those methods.

The fused Triton path runs its kernel under ``TRITON_INTERPRET=1`` on the CPU; here its
launch is replaced by a stub that counts one launch (the interpreter's own bookkeeping is
not what a GPU runs). Counts are of the second call of each configuration: the first one also
builds the cached shape-only index tensors of a tiled or masked call (on CUDA, one host-to-
device copy each, once per call signature).

Usage::

    python benchmarks/kernel_costs.py --out costs.csv            # every method, N 256..4096
    TRITON_INTERPRET=1 python benchmarks/kernel_costs.py --fused  # the fused ATC path
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops that make the host wait for the device (their output or its shape depends on data).
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.repeat_interleave.Tensor,
}

#: Ops that launch nothing: allocations and metadata.
_NO_LAUNCH = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "lift_fresh",
    "set_",
    "_unsafe_view",  # a reshape's view
    "scalar_tensor",  # a Python number wrapped on the host (torch.where(c, x, 0))
}


def _boolean_index(func, args) -> bool:
    """``x[mask]`` / ``x[mask] = v``: the output shape is the mask's count (a ``nonzero``)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    )


class CostCounter(TorchDispatchMode):
    """Counts launches and host syncs of the aten ops run under it (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._reading = False  # inside a wrapped host read (counted once, there)
        self.launches = 0
        self.syncs = 0
        self.ops: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (func in SYNC_OPS or _boolean_index(func, args)) and not self._reading:
            self.syncs += 1
            self.sync_ops[name] += 1
        if not func.is_view and name not in _NO_LAUNCH and func not in SYNC_OPS:
            self.launches += 1
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def host_reads(self) -> Iterator[None]:
        """Also count the host reads the dispatcher may not see (see the module doc)."""
        saved = {n: getattr(torch.Tensor, n) for n in _READS}

        def wrap(n: str, fn: Callable) -> Callable:
            def counted(t, *a, **k):
                if self._reading:
                    return fn(t, *a, **k)
                self.syncs += 1
                self.sync_ops[n] += 1
                self._reading = True
                try:
                    return fn(t, *a, **k)
                finally:
                    self._reading = False

            return counted

        try:
            for n, fn in saved.items():
                setattr(torch.Tensor, n, wrap(n, fn))
            yield
        finally:
            for n, fn in saved.items():
                setattr(torch.Tensor, n, fn)


_READS = ("tolist", "numpy", "item", "__int__", "__float__", "__index__", "__bool__")


def count(fn: Callable[[], Any], warmup: bool = True) -> CostCounter:
    """Launches and syncs of ``fn()`` (of its second call when ``warmup``)."""
    if warmup:
        fn()
    counter = CostCounter()
    with counter, counter.host_reads():
        fn()
    return counter


@contextlib.contextmanager
def stub_triton_launch() -> Iterator[list[int]]:
    """Replace the fused kernel's launch by a stub; yields a list that counts launches."""
    from atc_patch.kernel import triton_atc

    kernel, next_pow2, interpreted = triton_atc._kernel()
    launches: list[int] = []

    class _Stub:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(1)  # (the labels stay uninitialised: only counts matter)

            return launch

    saved = triton_atc._kernel
    triton_atc._kernel = lambda: (_Stub(), next_pow2, interpreted)
    try:
        yield launches
    finally:
        triton_atc._kernel = saved


CASES = [  # (name, cluster_tokens keyword arguments, tokens N -> (B, N, C) metric)
    ("atc single", {"linkage": "single"}),
    ("atc complete", {"linkage": "complete"}),
    ("atc average", {"linkage": "average"}),
    ("tome", {"method": "tome"}),
    ("kmedoids", {"method": "kmedoids"}),
    ("dpcknn", {"method": "dpcknn"}),
]


def grid_of(n: int) -> tuple[int, int]:
    side = int(n**0.5)
    return (side, n // side)


def rows(fused: bool, sizes: list[int], batch: int) -> list[dict]:
    """One row per (case, path, N): launches and syncs of one call."""
    import atc_patch

    out = []
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        metric = torch.randn(batch, n, 64, generator=gen)
        h, w = grid_of(n)
        mask = torch.ones(batch, n, dtype=torch.bool)
        mask[:, -n // 8 :] = False  # the last rows of the grid are padding
        paths = {
            "plain": {},
            "tiles 16x16": {"grid": (h, w), "tile": (16, 16)},
            "mask": {"mask": mask},
            "tiles + mask": {"grid": (h, w), "tile": (16, 16), "mask": mask},
        }
        cases = CASES[:3] if fused else CASES
        if not fused:
            cases = cases + [("tome_sd", {"method": "tome_sd", "h": h, "w": w, "no_rand": True})]
        for name, kw in cases:
            for path, extra in paths.items():
                if kw.get("method") == "tome_sd" and extra:
                    continue
                if kw.get("method") in ("kmedoids",) and n > 1024 and not extra.get("tile"):
                    continue  # (B, N, N) integer costs per iteration: minutes on this CPU
                opts = {**kw, **extra, **({"backend": "triton"} if fused else {})}
                if not kw.get("method") and not fused:
                    opts["backend"] = "torch"

                def call(metric=metric, r=n // 2, opts=opts):
                    return atc_patch.cluster_tokens(metric, r, **opts)

                if fused:
                    with stub_triton_launch() as launches:
                        c = count(call)
                    kernel = len(launches) // 2
                else:
                    c, kernel = count(call), 0
                out.append(
                    {
                        "method": name,
                        "path": path,
                        "backend": "triton (fused)" if fused else "torch",
                        "N": n,
                        "B": batch,
                        "launches": c.launches + kernel,
                        "syncs": c.syncs,
                        "sync_ops": dict(c.sync_ops),
                    }
                )
                print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="the fused ATC path (interpreter)")
    parser.add_argument("--out", default=None, help="CSV file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = rows(args.fused, args.sizes, args.batch)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return table


if __name__ == "__main__":
    sys.exit(main() and 0)
