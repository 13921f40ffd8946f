"""A roofline cost model of the GPU work that torch code issues, counted on the meta device.

Contract: run any torch code on ``meta`` tensors inside ``with CostModel(H100) as cm:``; every
aten op that would be a GPU kernel is charged ``max(bytes / bandwidth, flops / peak) + launch``
and counted, host synchronisations are counted (and answered with a plausible value so the run
goes on), and ``cm.totals`` holds the sums. Nothing is measured: every figure is modelled.

    from _costmodel import H100, CostModel, to_device

    with CostModel(H100) as cm:
        out = model(**to_device(cm, inputs))       # model built on the meta device
    print(f"{cm.totals.ms:.2f} ms, {cm.totals.launches} launches, {cm.totals.syncs} syncs")

What is charged how:

* views, allocations (``empty``) and metadata ops are free and launch nothing;
* ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / ``convolution``: ``2 * multiply-adds`` flops at
  the peak of their dtype (bf16/fp16 ``peak_flops``, fp32/fp64 ``peak_flops_fp32``: PyTorch's
  default fp32 matmul does not use TF32), and the bytes of their inputs and outputs;
* every other op: the bytes it reads and writes (inputs + outputs; a broadcast input counts
  its stored elements once; an op that overwrites its destination, ``copy_`` / ``fill_`` /
  ``zero_``, does not read it); one launch each;
* ``F.scaled_dot_product_attention`` is caught before it decomposes (a ``TorchFunctionMode``)
  and charged as flash attention: ``2 * B * H * Nq * Nk * (D + Dv)`` flops (``4 * B * H * Nq *
  Nk * D`` when ``Dv == D``; half of it when causal) and the bytes of q, k, v, the output and
  a mask if one is given, one launch;
* host synchronisations, counted (``totals.syncs``) and timed at ``Hardware.sync_s`` each
  (0 by default: counted, not timed): ``.item()`` / ``bool()`` / ``float()``
  (``aten._local_scalar_dense``), ``aten.nonzero``, ``aten.masked_select``, ``aten.equal``,
  and copies between the host and the device (``.cpu()``, ``.tolist()``, ``.to("cuda")`` of a
  host tensor, which PyTorch synchronises unless ``non_blocking``);
* ops registered in ``cm.kernels`` (by schema name, e.g. a custom op) are costed by the
  handler given there (see :meth:`CostModel.charge`).

Values: a meta tensor has none, so a sync on one returns a *shadow* value where one is known
and a plausible constant otherwise (``True``, ``0``, ``0.0``; ``nonzero`` of every element).
Shadows are CPU copies of small tensors given with values (:func:`to_device` keeps those of at
most ``shadow_limit`` elements: timesteps, position ids) and of every op computed only from
shadowed tensors, so ``int(ids.max())`` on meta gives the real number.

Ops run on the device types in ``devices`` (``{"meta"}``) are charged; ops on host tensors
(a CPU generator's draws, ...) are host work and are not. A ``CostModel(devices={"cpu"})``
charges CPU tensors as if they lived on the GPU: that is how a data-dependent call (with
values) is costed op by op at its real shape.
"""

from __future__ import annotations

import math
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten


@dataclass(frozen=True)
class Hardware:
    """The constants of the model.

    Attributes:
        name: what the constants describe.
        bandwidth: HBM bytes per second.
        peak_flops: dense bf16/fp16 tensor-core flop/s.
        peak_flops_fp32: fp32/fp64 matmul flop/s (no TF32: PyTorch's default).
        launch_s: seconds added per kernel launch.
        sms: streaming multiprocessors (programs that run at once, one per SM).
        sync_s: seconds added per host synchronisation (0: counted, not timed).
    """

    name: str
    bandwidth: float
    peak_flops: float
    peak_flops_fp32: float
    launch_s: float
    sms: int
    sync_s: float = 0.0


H100 = Hardware("H100 SXM", 3.35e12, 600e12, 60e12, 4e-6, 132)
H200 = replace(H100, name="H200", bandwidth=4.8e12)
PRESETS = {"h100": H100, "h200": H200}


@dataclass
class Totals:
    """Sums over the ops charged so far (``seconds_by``: per category, see ``CostModel``)."""

    seconds: float = 0.0
    launches: int = 0
    syncs: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    seconds_by: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


@dataclass(frozen=True)
class Charge:
    """One charged op, kept when ``CostModel(record=True)`` so a run can be replayed scaled."""

    bytes: float
    flops: float
    peak: float
    launches: int
    extra_s: float
    category: str
    syncs: int = 0
    site: str = ""


MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
CONVOLUTIONS = {aten.convolution, aten.convolution_overrideable}
FLASH_OPS = {
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
}
FREE_OPS = {
    aten.empty,
    aten.empty_strided,
    aten.empty_like,
    aten.new_empty,
    aten.new_empty_strided,
    aten._unsafe_view,
    aten.lift_fresh,
    aten.lift_fresh_copy,
    aten.resize_,
    aten.set_,
    aten.sym_size,
    aten.sym_stride,
    aten.sym_numel,
    aten.sym_storage_offset,
    aten.is_same_size,
    aten.record_stream,
    aten.resolve_conj,
    aten.resolve_neg,
}
OVERWRITE_OPS = {aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.random_}
SYNC_OPS = {
    aten._local_scalar_dense,
    aten.item,  # seen undecomposed under inference_mode
    aten.is_nonzero,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
}
# Read a host tensor's data without an aten op: a sync when the tensor stands for a device one.
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}
PROJECT_DIRS = ("/atc_patch/", "/diffusers/", "/timm/", "/transformers/")


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads of ``t``: broadcast (stride 0) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def matmul_flops(func: Any, args: tuple, out: torch.Tensor) -> float:
    """``2 * multiply-adds`` of an ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` call."""
    a = args[1] if func._overloadpacket in (aten.addmm, aten.baddbmm) else args[0]
    return 2.0 * out.numel() * a.shape[-1]


def conv_flops(args: tuple, out: torch.Tensor) -> float:
    """``2 * multiply-adds`` of ``aten.convolution(input, weight, bias, ..., transposed, ...)``."""
    x, weight, transposed = args[0], args[1], args[6]
    per_output = weight.shape[1] * math.prod(weight.shape[2:])
    return 2.0 * (x.numel() if transposed else out.numel()) * per_output


def flash_cost(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_numel: int,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[float, float]:
    """``(flops, bytes)`` of flash attention on q ``(..., Nq, D)``, k ``(..., Nk, D)``, v
    ``(..., Nk, Dv)``: ``2 * Nq * Nk * (D + Dv)`` flops per batch-and-head (half if causal);
    bytes of q, k, v, the output (``out_numel`` elements of q's dtype) and the mask."""
    heads = math.prod(q.shape[:-2])
    nq, d, nk, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    flops = 2.0 * heads * nq * nk * (d + dv) * (0.5 if causal else 1.0)
    nbytes = sum(touched_bytes(t) for t in (q, k, v)) + out_numel * q.element_size()
    if mask is not None:
        nbytes += touched_bytes(mask)
    return flops, float(nbytes)


class CostModel:
    """Charge the GPU work of the torch code run inside ``with CostModel(hw) as cm:``.

    Args:
        hardware: the constants (:data:`H100`, :data:`H200` or your own :class:`Hardware`).
        devices: device types whose ops are charged (``{"meta"}``; ``{"cpu"}`` to cost CPU
            tensors as if on the GPU).
        shadow_limit: largest tensor (elements) given a CPU shadow value.
        record: keep every :class:`Charge` in ``cm.charges`` (for :meth:`replay`).

    Attributes:
        totals: the :class:`Totals` so far.
        kernels: ``{schema name: handler(cm, func, args, kwargs) -> output}`` for ops costed by
            their own formula (the handler charges with :meth:`charge`).
    """

    def __init__(
        self,
        hardware: Hardware = H100,
        *,
        devices: frozenset[str] | set[str] = frozenset({"meta"}),
        shadow_limit: int = 1 << 16,
        record: bool = False,
    ) -> None:
        self.hw = hardware
        self.devices = frozenset(devices)
        self.shadow_limit = shadow_limit
        self.totals = Totals()
        self.kernels: dict[str, Callable[..., Any]] = {}
        self.charges: list[Charge] | None = [] if record else None
        self.shadows = WeakTensorKeyDictionary()
        self._category: str | None = None  # None: booked by kind (memory, gemm, attention)
        self._paused = 0
        self._modes = (_FunctionMode(self), _DispatchMode(self))

    # -- the context ----------------------------------------------------------------------------
    def __enter__(self) -> CostModel:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run ops without charging them (setting up inputs, building stand-ins)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def category(self, name: str) -> Iterator[None]:
        """Book the ops run inside under ``totals.seconds_by[name]`` (instead of by kind)."""
        old, self._category = self._category, name
        try:
            yield
        finally:
            self._category = old

    # -- charging -------------------------------------------------------------------------------
    def charge(
        self,
        nbytes: float,
        flops: float = 0.0,
        *,
        peak: float | None = None,
        launches: int = 1,
        extra_s: float = 0.0,
        category: str | None = None,
    ) -> float:
        """Charge one kernel: ``max(nbytes / bandwidth, flops / peak) + launches * launch_s +
        extra_s`` seconds (``peak`` defaults to ``peak_flops``), booked under the current
        :meth:`category`, else ``category``, else ``"memory"``. Returns the seconds."""
        item = Charge(
            nbytes,
            flops,
            peak or self.hw.peak_flops,
            launches,
            extra_s,
            self._category or category or "memory",
        )
        return self._book(item)

    def sync(self, site: str | None = None) -> None:
        """Count one host synchronisation (``site``: where; default: the calling frame)."""
        site = site or _caller_site()
        self._book(Charge(0.0, 0.0, 1.0, 0, 0.0, self._category or "sync", syncs=1, site=site))

    def replay(self, charges: list[Charge], scale: float = 1.0) -> None:
        """Charge ``charges`` again with bytes, flops and extra seconds times ``scale``
        (launches and syncs unchanged): a run at batch ``b`` stands for batch ``scale * b``.
        Booked under the current :meth:`category` if one is set."""
        for c in charges:
            self._book(
                replace(
                    c,
                    bytes=c.bytes * scale,
                    flops=c.flops * scale,
                    extra_s=c.extra_s * scale,
                    category=self._category or c.category,
                )
            )

    def _book(self, c: Charge) -> float:
        t = self.totals
        seconds = max(c.bytes / self.hw.bandwidth, c.flops / c.peak) if c.launches else 0.0
        seconds += c.launches * self.hw.launch_s + c.extra_s + c.syncs * self.hw.sync_s
        t.seconds += seconds
        t.launches += c.launches
        t.syncs += c.syncs
        t.bytes += c.bytes
        t.flops += c.flops
        if seconds:
            t.seconds_by[c.category] += seconds
        if c.syncs:
            t.sync_sites[c.site] += c.syncs
        if self.charges is not None:
            self.charges.append(c)
        return seconds

    def peak_of(self, dtype: torch.dtype) -> float:
        """Matmul flop/s in ``dtype``: tensor cores for bf16/fp16, the fp32 peak otherwise."""
        half = dtype in (torch.bfloat16, torch.float16)
        return self.hw.peak_flops if half else self.hw.peak_flops_fp32

    def on_device(self, tensors: list[torch.Tensor]) -> bool:
        return any(t.device.type in self.devices for t in tensors)

    # -- attention ------------------------------------------------------------------------------
    def flash_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """``F.scaled_dot_product_attention``, charged as one flash-attention kernel."""
        shape = (*query.shape[:-1], value.shape[-1])
        flops, nbytes = flash_cost(query, key, value, math.prod(shape), attn_mask, is_causal)
        if self.on_device([query, key, value]):
            self.charge(nbytes, flops, peak=self.peak_of(query.dtype), category="attention")
        with self.paused():
            if query.is_meta:
                return query.new_empty(shape)
            return F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        packet = func._overloadpacket
        handler = self.kernels.get(func._schema.name)
        if handler is not None:
            return handler(self, func, args, kwargs)
        if packet in SYNC_OPS and self.on_device(_tensors((args, kwargs))):
            return self._sync_op(func, args, kwargs)
        if packet in (aten._to_copy, aten.copy_) and self._crosses_host(func, args, kwargs):
            return self._transfer(func, args, kwargs)
        out = func(*args, **kwargs)
        self._propagate_shadows(func, args, kwargs, out)
        if func.is_view or packet in FREE_OPS:
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if not self.on_device(inputs + outputs):
            return out  # host work
        if packet in OVERWRITE_OPS:
            inputs = inputs[1:]
        nbytes = sum(touched_bytes(t) for t in inputs) + sum(
            t.numel() * t.element_size() for t in outputs
        )
        if packet in MATMULS or packet in CONVOLUTIONS:
            y = outputs[0]
            flops = matmul_flops(func, args, y) if packet in MATMULS else conv_flops(args, y)
            self.charge(nbytes, flops, peak=self.peak_of(y.dtype), category="gemm")
        elif packet in FLASH_OPS:
            q, k, v = args[:3]
            flops, nbytes = flash_cost(q, k, v, outputs[0].numel())
            self.charge(nbytes, flops, peak=self.peak_of(q.dtype), category="attention")
        else:
            self.charge(nbytes)
        return out

    def _crosses_host(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if func._overloadpacket is aten.copy_:
            src, dst = args[1], args[0]
            return isinstance(src, torch.Tensor) and src.device.type != dst.device.type
        target = kwargs.get("device")
        return target is not None and torch.device(target).type != args[0].device.type

    def _transfer(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A host <-> device copy: one host synchronisation (PyTorch waits for it)."""
        src = args[1] if func._overloadpacket is aten.copy_ else args[0]
        to_device = src.device.type not in self.devices
        self.sync()
        if src.is_meta and not to_device:  # device -> host: values from the shadow
            shadow = self.shadows.get(src)
            value = shadow if shadow is not None else torch.zeros(src.shape, dtype=src.dtype)
            if func._overloadpacket is aten.copy_:
                return args[0].copy_(value)
            return value.to(kwargs.get("dtype") or src.dtype).clone()
        out = func(*args, **kwargs)
        if to_device and isinstance(out, torch.Tensor) and out.is_meta:
            if src.numel() <= self.shadow_limit and not src.is_meta:
                self.shadows[out] = src.detach().to(out.dtype).clone()
        return out

    def _sync_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A host synchronisation: counted; on meta, answered from shadows or a constant."""
        self.sync()
        metas = [t for t in _tensors(args) if t.is_meta]
        if not metas:
            return func(*args, **kwargs)
        shadowed = self._shadow_args((args, kwargs))
        packet = func._overloadpacket
        if shadowed is not None:
            value = func(*shadowed[0], **shadowed[1])
            if not isinstance(value, torch.Tensor):
                return value
            out = value.to("meta")
            self.shadows[out] = value
            return out
        x = metas[0]
        if packet in (aten._local_scalar_dense, aten.item):
            if x.dtype == torch.bool:
                return True
            return 0.0 if x.is_floating_point() else 0
        if packet in (aten.equal, aten.is_nonzero):
            return True
        if packet is aten.nonzero:
            return x.new_empty((x.numel(), x.dim()), dtype=torch.long)
        return x.new_empty((x.numel(),))  # masked_select: every element

    # -- shadows --------------------------------------------------------------------------------
    def _shadow_args(self, tree: Any) -> Any | None:
        """``tree`` with every meta tensor replaced by its shadow (meta devices by ``cpu``),
        or ``None`` if some meta tensor has none."""
        missing = False

        def swap(x: Any) -> Any:
            nonlocal missing
            if isinstance(x, torch.Tensor) and x.is_meta:
                s = self.shadows.get(x)
                missing = missing or s is None
                return s
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        out = tree_map(swap, tree)
        return None if missing else out

    def _propagate_shadows(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Give ``out`` shadows when every meta input has one (or, for a deterministic
        factory op on meta, when the output is small)."""
        metas_in = [t for t in _tensors((args, kwargs)) if t.is_meta]
        outs = [t for t in _tensors(out) if t.is_meta]
        if not outs or any(t.numel() > self.shadow_limit for t in outs):
            return
        if not metas_in:
            device = kwargs.get("device")
            seeded = torch.Tag.nondeterministic_seeded in func.tags
            if device is None or torch.device(device).type != "meta" or seeded:
                return
        if not all(t in self.shadows for t in metas_in):
            for t in _written_args(func, args, kwargs):  # a mutation without values: stale
                self.shadows.pop(t, None)
            return
        shadowed = self._shadow_args((args, kwargs))
        with torch.no_grad():
            values = _tensors(func(*shadowed[0], **shadowed[1]))
        if func.overloadpacket.__name__ in _UNINITIALISED:  # zeros, not whatever memory the CPU
            values = [torch.zeros_like(v) for v in values]  # op returned (e.g. plans' labels)
        for t, v in zip(_tensors(out), values, strict=False):
            if t.is_meta and v.shape == t.shape:
                self.shadows[t] = v


_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _written_args(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            out += [value] if isinstance(value, torch.Tensor) else []
    return out


def _caller_site() -> str:
    """``file:line (function)`` of the innermost frame in a model or atc_patch source file."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(d in frame.filename for d in PROJECT_DIRS):
            path = frame.filename
            for d in PROJECT_DIRS:
                if d in path:
                    path = d.strip("/") + "/" + path.split(d, 1)[1]
                    break
            return f"{path}:{frame.lineno} ({frame.name})"
    return "elsewhere"


class _DispatchMode(TorchDispatchMode):
    def __init__(self, cm: CostModel) -> None:
        super().__init__()
        self.cm = cm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.cm._paused:
            return func(*args, **kwargs)
        return self.cm._dispatch(func, args, kwargs)


class _FunctionMode(TorchFunctionMode):
    def __init__(self, cm: CostModel) -> None:
        super().__init__()
        self.cm = cm

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        cm = self.cm
        if cm._paused:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return cm.flash_attention(*args, **kwargs)
        if func in HOST_READS and not args[0].is_meta and cm.on_device([args[0]]):
            cm.sync()  # (a meta tensor's read goes through aten._to_copy: counted there)
        return func(*args, **kwargs)


def to_device(cm: CostModel, tree: Any, device: str = "meta") -> Any:
    """Move the tensors of ``tree`` to ``device`` uncharged, keeping a CPU shadow of each small
    one (at most ``cm.shadow_limit`` elements) so that syncs on it give its real values."""

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        with cm.paused():
            out = x.to(device)
        if out.is_meta and not x.is_meta and x.numel() <= cm.shadow_limit:
            cm.shadows[out] = x.detach().clone()
        return out

    return tree_map(move, tree)
