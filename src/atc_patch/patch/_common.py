"""Helpers every family patch shares: the patch record and reversible class swapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

_INFO_ATTR = "_atc_patch"
_ORIG_CLASS_ATTR = "_atc_orig_class"


@dataclass
class PatchInfo:
    """What a patched model remembers: its family, the method and the settings it was given."""

    family: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)


def get_patch_info(model: Any) -> PatchInfo | None:
    """The :class:`PatchInfo` stored on ``model`` by ``apply_patch``, or ``None``."""
    return getattr(model, _INFO_ATTR, None)


def set_patch_info(model: Any, info: PatchInfo) -> None:
    # object.__setattr__ keeps nn.Module from registering anything.
    object.__setattr__(model, _INFO_ATTR, info)


def clear_patch_info(model: Any) -> None:
    if _INFO_ATTR in vars(model):
        object.__delattr__(model, _INFO_ATTR)


def swap_class(module: nn.Module, mixin: type, name_prefix: str = "ATC") -> None:
    """Give ``module`` a subclass of its own class with ``mixin`` in front (ToMe's approach).

    The module keeps its parameters, buffers, hooks and identity; only method lookup changes.
    :func:`restore_class` undoes it.
    """
    orig = type(module)
    if _ORIG_CLASS_ATTR in vars(module):
        raise RuntimeError(f"{orig.__name__} is already patched")
    patched = type(f"{name_prefix}{orig.__name__}", (mixin, orig), {})
    object.__setattr__(module, _ORIG_CLASS_ATTR, orig)
    module.__class__ = patched


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class` (no-op for a module that was not swapped)."""
    orig = vars(module).get(_ORIG_CLASS_ATTR)
    if orig is not None:
        module.__class__ = orig
        object.__delattr__(module, _ORIG_CLASS_ATTR)
