"""Plans kept across blocks (``plan_scope="resolution"``) and model calls (``reuse_steps``).

:func:`lookup` is what :func:`~.core.block_plan` asks instead of making a plan when either
option is set. A plan is keyed by ``(B, N)`` (``plan_scope="resolution"``: one plan per token
resolution, made from the first patched block of it) or ``(B, N, block)`` (``"block"``):

* within a call, the plans it looked up are kept on the :class:`~.core.Call`, so every later
  block of that resolution, and a gradient-checkpoint recomputation, applies the same plan;
* across calls (``reuse_steps=k``), the root's :class:`PlanStore` keeps them: the calls are
  counted on the host (no tensor is read), the plans are made again on every ``k``-th call,
  and a call whose first patched block sees another ``(B, N)``, dtype or device (a CFG batch
  switched on or off, another batch size or resolution) drops them and starts the count anew.

Where the store lives: one :class:`PlanStore` per patched root, bound into its blocks' hooks at
patch time, with one state per thread (``threading.local``): concurrent calls in threads and
``DataParallel`` replicas (which run in threads of their own and share the hooks) never see
each other's plans. A copy or a pickle of the model gets an empty store. While
``torch.compile`` traces, the state is one plain attribute (the count is kept modulo ``k``, so
a compiled model has at most ``k + 1`` graphs)::

    plan = lookup(call, spec, x, make)          # make() -> MergePlan | None
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...kernel.plan import MergePlan

if TYPE_CHECKING:
    from .core import BlockSpec, Call

_MISSING = object()


@dataclass
class _State:
    """One thread's plans: the call signature they were made for, the calls since they were
    made (modulo ``reuse_steps``), and the plans by key."""

    signature: tuple | None = None
    age: int = 0
    plans: dict[tuple, MergePlan | None] = field(default_factory=dict)


class PlanStore:
    """The plans a patched root keeps across its calls (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._traced: _State | None = None

    def state(self) -> _State:
        """This thread's state (while compiling: the traced one)."""
        if torch.compiler.is_compiling():
            if self._traced is None:
                self._traced = _State()
            return self._traced
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _State()
        return state

    def __reduce__(self) -> tuple[Any, tuple]:  # copies and pickles start empty
        return PlanStore, ()

    def __deepcopy__(self, memo: dict) -> PlanStore:
        return PlanStore()


def lookup(
    call: Call, spec: BlockSpec, x: Tensor, make: Callable[[], MergePlan | None]
) -> MergePlan | None:
    """The plan of block ``spec`` on its input tokens ``x`` ``(B, N, C)`` in ``call``: the one
    this call already uses for its key, else a kept one (``reuse_steps``), else ``make()``."""
    cfg = spec.config
    b, n = x.shape[:2]
    key = (b, n) if cfg.plan_scope == "resolution" else (b, n, spec.index)
    plan = call.plans.get(key, _MISSING)
    if plan is not _MISSING:
        return plan
    if cfg.reuse_steps > 1 and spec.store is not None:
        state = spec.store.state()
        if not call.counted:  # the call's first lookup: count it
            call.counted = True
            _count(state, (b, n, x.dtype, x.device), cfg.reuse_steps)
        plan = state.plans.get(key, _MISSING)
        if plan is _MISSING:
            plan = state.plans[key] = make()
    else:
        plan = make()
    call.plans[key] = plan
    return plan


def _count(state: _State, signature: tuple, steps: int) -> None:
    """A new call with ``signature``: the plans are dropped on a new signature and on every
    ``steps``-th call."""
    if state.signature != signature:
        state.signature, state.age = signature, 0
        state.plans.clear()
        return
    state.age = (state.age + 1) % steps
    if state.age == 0:
        state.plans.clear()
