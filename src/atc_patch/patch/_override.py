"""Reversible instance-level overrides: how a family changes a module without changing its class.

A patched module keeps its exact class, so the libraries' own registries and introspection see
the original (diffusers' block registry, transformers' class-name lookups, ``isinstance``,
``torch.fx`` leaf rules). A method is replaced by an instance attribute, a
``functools.partial(impl, module, *bound)`` of a module-level function ``impl``: it pickles,
deep-copies (the copy's override is bound to the copy) and compiles with ``fullgraph=True``;
its ``__wrapped__`` is the method it replaced, so ``inspect.signature(module.forward)`` shows
the original signature. Everything an override or hook added is remembered in one attribute
of the module and undone by :func:`restore`::

    def _forward(module, cfg, x):                   # the patched forward
        return original(module, "forward")(x) * cfg

    override(block, "forward", _forward, 2.0)       # block.forward(x) -> _forward(block, 2.0, x)
    restore(block)                                  # block.forward is the class's again
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

SAVED_ATTR = "_atc_saved"


class _Missing:
    """Marks a name the module's instance dict did not hold (pickles and copies as itself)."""

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


@dataclass
class _Saved:
    """What :func:`override` / :func:`add_hook` changed on one module."""

    attrs: dict[str, Any] = field(default_factory=dict)  # name -> previous instance value
    # name -> the class's function, for a name with no previous instance value (held as an
    # object: torch.compile calls it, where it cannot look it up on some library classes)
    funcs: dict[str, Callable[..., Any]] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)  # RemovableHandle


def _saved(module: nn.Module) -> _Saved:
    saved = vars(module).get(SAVED_ATTR)
    if saved is None:
        saved = _Saved()
        object.__setattr__(module, SAVED_ATTR, saved)
    return saved


def override(module: nn.Module, name: str, impl: Callable[..., Any], *bound: Any) -> None:
    """Make ``module.<name>(*args, **kwargs)`` call ``impl(module, *bound, *args, **kwargs)``.

    ``impl`` must be a module-level function (so the override pickles); ``bound`` holds
    immutable configuration only. ``name`` may be one the class does not define (e.g.
    ``__prepare_scriptable__``). Overriding the same name twice raises ``RuntimeError``.
    """
    saved = _saved(module)
    if name in saved.attrs:
        raise RuntimeError(f"{type(module).__name__}.{name} is already overridden")
    saved.attrs[name] = vars(module).get(name, _MISSING)
    func = getattr(type(module), name, None)  # None: a name the class does not define
    if saved.attrs[name] is _MISSING and func is not None:
        saved.funcs[name] = func
    _bind(module, name, functools.partial(impl, module, *bound), getattr(module, name, None))
    if _REPLICATE not in saved.attrs:  # DataParallel replicas get overrides bound to them
        override(module, _REPLICATE, _replicate)


def _bind(module: nn.Module, name: str, wrapper: functools.partial, replaced: Any) -> None:
    if replaced is not None:
        wrapper.__wrapped__ = replaced  # type: ignore[attr-defined]
    object.__setattr__(module, name, wrapper)


_REPLICATE = "_replicate_for_data_parallel"


def _replicate(module: nn.Module) -> nn.Module:
    """``nn.Module._replicate_for_data_parallel`` for an overridden module: the replica's
    ``__dict__`` is a shallow copy, so its overrides are re-bound to the replica itself."""
    replica = original(module, _REPLICATE)()
    saved = vars(module)[SAVED_ATTR]
    object.__setattr__(replica, SAVED_ATTR, _Saved(dict(saved.attrs), dict(saved.funcs)))
    for name in saved.attrs:
        wrapper = vars(module)[name]
        if isinstance(wrapper, functools.partial) and wrapper.args[:1] == (module,):
            rebound = functools.partial(wrapper.func, replica, *wrapper.args[1:])
            _bind(replica, name, rebound, getattr(wrapper, "__wrapped__", None))
    return replica


def original(module: nn.Module, name: str) -> Callable[..., Any]:
    """The ``name`` method ``module`` had before :func:`override` (bound to ``module``)."""
    saved = vars(module).get(SAVED_ATTR)
    previous = _MISSING if saved is None else saved.attrs.get(name, _MISSING)
    if previous is not _MISSING:
        return previous
    func = saved.funcs.get(name) if saved is not None else None
    return functools.partial(func or getattr(type(module), name), module)


def is_overridden(module: nn.Module, name: str) -> bool:
    saved = vars(module).get(SAVED_ATTR)
    return saved is not None and name in saved.attrs


def add_hook(module: nn.Module, handle: Any) -> None:
    """Remember a hook ``handle`` (``register_forward_hook`` & co.) for :func:`restore`."""
    _saved(module).hooks.append(handle)


def restore(module: nn.Module) -> None:
    """Undo every :func:`override` and :func:`add_hook` on ``module`` (no-op if none)."""
    saved = vars(module).pop(SAVED_ATTR, None)
    if saved is None:
        return
    for name, previous in saved.attrs.items():
        if previous is _MISSING:
            vars(module).pop(name, None)
        else:
            object.__setattr__(module, name, previous)
    for handle in saved.hooks:
        handle.remove()


def restore_tree(root: nn.Module) -> None:
    """:func:`restore` on ``root`` and every module under it."""
    for module in root.modules():
        restore(module)


def patched_modules(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` (itself included) that carry an override or hook."""
    return [m for m in root.modules() if SAVED_ATTR in vars(m)]
