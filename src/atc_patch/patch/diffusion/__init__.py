"""The diffusion core: UNets (:mod:`.unet`) and diffusion transformers (:mod:`.dit`) patched alike.

A family gives a table of ``(block, BlockSpec)``: which blocks are patched and, per block, which
sublayers run on merged tokens (a :class:`~.merge.Span` per sublayer attribute); and a root
forward pre-hook that starts a :class:`~.core.Call` with the token grid and timestep of the
call. :func:`patch` does the rest, through :mod:`.._override` only (every module keeps its
class): each block gets a forward pre-hook / hook pair that makes it the running block of its
call (its plan is made from its input tokens when a sublayer first needs it, or found in
:mod:`.reuse`'s stores), each named sublayer's ``forward`` becomes :func:`~.merge.merge_around`
(under ``merge="kv"`` an attention sublayer's becomes :func:`~.kv.kv_around`), the root gets the
call's hooks::

    spec = BlockSpec(config, index=0, spans=(("attn1", Span(mask="keys")),))
    patch(unet, [(block, spec)], functools.partial(enter_unet_call, ...))
    unpatch(unet)                               # exactly as before
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .._override import add_hook, override, restore_tree
from . import kv, reuse
from .core import (
    BlockSpec,
    Call,
    enter_block,
    enter_call,
    exit_block,
    exit_call,
    unwrap_checkpointing,
)
from .merge import JointMask, Rotary, Span

__all__ = ["BlockSpec", "Call", "JointMask", "Rotary", "Span", "enter_call", "patch", "unpatch"]


def patch(
    root: nn.Module,
    blocks: Sequence[tuple[nn.Module, BlockSpec]],
    enter: Callable[[nn.Module, tuple, dict], Any],
) -> None:
    """Patch ``blocks`` (validated by the family) and ``root``, whose pre-hook is ``enter``."""
    store = reuse.PlanStore() if any(s.config.reuse_steps > 1 for _, s in blocks) else None
    for block, spec in blocks:
        spec = dataclasses.replace(spec, store=store)
        _hook(
            block,
            block.register_forward_pre_hook(functools.partial(enter_block, spec), with_kwargs=True),
        )
        _hook(block, block.register_forward_hook(exit_block, with_kwargs=True, always_call=True))
        for name, forward, span in kv.sublayers(spec, block):
            override(getattr(block, name), "forward", forward, span, spec.index)
    _hook(root, root.register_forward_pre_hook(enter, with_kwargs=True))
    _hook(root, root.register_forward_hook(exit_call, with_kwargs=True, always_call=True))


def _hook(module: nn.Module, handle: Any) -> None:
    try:
        add_hook(module, handle)
    except BaseException:
        handle.remove()
        raise


def unpatch(root: nn.Module) -> None:
    """Undo :func:`patch` under ``root`` (also a partial one), and the checkpoint wrappers."""
    restore_tree(root)
    unwrap_checkpointing(root)
