"""Helpers every family patch shares: the patch record and reversible class swapping.

Patched classes have a picklable identity: ``pickle``/``torch.save``/``copy.deepcopy`` of a
patched model rebuild each module's patched class from its (importable) mixin and original
class, so a patched model round-trips into a working patched model.
"""

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


_PATCHED_CLASSES: dict[tuple[type, type, str], type] = {}


def _new_patched(mixin: type, orig: type, name_prefix: str) -> Any:
    """Unpickling helper: an empty instance of the patched class of ``(mixin, orig)``."""
    cls = patched_class(mixin, orig, name_prefix)
    return cls.__new__(cls)


def _reduce_patched(self: Any, protocol: int) -> tuple:
    # Pickle the instance as "an instance of patched_class(mixin, orig)" rather than by the
    # dynamic class's name, which no module holds. State (parameters, submodules) is as usual.
    rv = object.__reduce_ex__(self, protocol)
    mixin, orig, prefix = type(self)._atc_patched_from
    return (_new_patched, (mixin, orig, prefix), *rv[2:])


def patched_class(mixin: type, orig: type, name_prefix: str = "ATC") -> type:
    """The subclass of ``orig`` with ``mixin`` in front, made once per ``(mixin, orig)``."""
    key = (mixin, orig, name_prefix)
    cls = _PATCHED_CLASSES.get(key)
    if cls is None:
        cls = type(
            f"{name_prefix}{orig.__name__}",
            (mixin, orig),
            {"__reduce_ex__": _reduce_patched, "_atc_patched_from": key},
        )
        _PATCHED_CLASSES[key] = cls
    return cls


def swap_class(module: nn.Module, mixin: type, name_prefix: str = "ATC") -> None:
    """Give ``module`` a subclass of its own class with ``mixin`` in front (ToMe's approach).

    The module keeps its parameters, buffers, hooks and identity; only method lookup changes.
    :func:`restore_class` undoes it. ``mixin`` must be importable (a module-level class) for
    the patched module to pickle.
    """
    orig = type(module)
    if _ORIG_CLASS_ATTR in vars(module):
        raise RuntimeError(f"{orig.__name__} is already patched")
    object.__setattr__(module, _ORIG_CLASS_ATTR, orig)
    module.__class__ = patched_class(mixin, orig, name_prefix)


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class` (no-op for a module that was not swapped)."""
    orig = vars(module).get(_ORIG_CLASS_ATTR)
    if orig is not None:
        module.__class__ = orig
        object.__delattr__(module, _ORIG_CLASS_ATTR)


def restore_tree(root: nn.Module, *attrs: str) -> None:
    """Undo :func:`swap_class` on ``root`` and every submodule, and drop the per-module
    attributes ``attrs`` that a family stored on them (absent ones are skipped)."""
    for module in root.modules():
        restore_class(module)
        for attr in attrs:
            if attr in vars(module):
                object.__delattr__(module, attr)
