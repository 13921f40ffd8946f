"""Option checking shared by every family patch and the schedule, so that all of them reject
bad input the same way: a ``ValueError`` that names the option, what it got and the valid
choices (an unsupported *model* is a ``TypeError``, see :func:`atc_patch.apply_patch`).

Numbers, one rule for the whole public API (:func:`as_int`): integral values of any numeric
type are accepted as ints (``4``, ``4.0``, ``numpy.int64(4)``, a 0-d integer tensor);
non-integral values, strings and bools are rejected with a ``ValueError`` naming what is
accepted. Floats accept any real number type except bools and strings.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def check_options(
    family: str,
    options: Mapping[str, Any],
    valid: Iterable[str],
    hints: Mapping[str, str] | None = None,
) -> None:
    """Raise ``ValueError`` if ``options`` holds a name not in ``valid``.

    Args:
        family: what is being patched, for the message (e.g. ``"timm ViT"``).
        options: the keyword options given by the user.
        valid: the option names this family/method accepts.
        hints: per unknown name, what to pass instead (e.g. :data:`atc_patch.patch.config.HINTS`).

    Raises:
        ValueError: listing the unknown names, the valid ones, and a hint for each known
            cross-family name.
    """
    valid = list(valid)
    unknown = sorted(k for k in options if k not in valid)
    if not unknown:
        return
    notes = [f"{k}: {hints[k]}" for k in unknown if hints and k in hints]
    msg = f"unknown option(s) {unknown} for {family}; valid options: {sorted(valid)}"
    if notes:
        msg += " (" + "; ".join(notes) + ")"
    raise ValueError(msg)


#: What :func:`as_int` accepts, for error messages.
INTEGER_FORMS = "an int, a numpy integer, a 0-d integer tensor or an integral float such as 6.0"


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int if it is an integral number: the one number rule of the API.

    Accepted: ``int``, numpy integers, 0-d integer (or integral floating) tensors and arrays,
    and integral floats (``6.0``). Reading a tensor's value is a host synchronisation (on a GPU
    it waits for the queue), so pass plain ints on hot paths.

    Raises:
        ValueError: for bools (also bool tensors), strings, non-numbers, tensors or arrays with
            more than one element, non-integral numbers, or values below ``minimum``; the
            message names what is accepted.
    """
    bad = ValueError(f"{name} must be an integer ({INTEGER_FORMS}), got {value!r}")
    if isinstance(value, (bool, str, bytes)) or _is_bool_dtype(value):
        raise bad
    if getattr(value, "ndim", 0) != 0:
        raise ValueError(
            f"{name} must be an integer ({INTEGER_FORMS}), got an array of shape "
            f"{tuple(value.shape)}"
        )
    try:
        out = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        if not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
            raise bad from None
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not f.is_integer():
            raise ValueError(
                f"{name} must be an integer ({INTEGER_FORMS}), got the non-integral {value!r}"
            ) from None
        out = int(f)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return int(out)


def _is_bool_dtype(value: Any) -> bool:
    """True for numpy and torch booleans (scalars, arrays, tensors)."""
    return str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def as_float(name: str, value: Any) -> float:
    """``value`` as a Python float if it is a real number (not a bool or a string).

    Raises:
        ValueError: for bools, strings and non-numbers.
    """
    if isinstance(value, (bool, str, bytes)) or _is_bool_dtype(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def as_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (numpy bools too); ``ValueError`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def as_int_list(name: str, value: Any, minimum: int | None = None) -> tuple[int, ...]:
    """A single integer or a sequence of integers as a tuple of ints (see :func:`as_int`).

    Raises:
        ValueError: for strings, mappings, and any entry :func:`as_int` rejects.
    """
    if isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{name} must be an integer or a list of integers, got {value!r}")
    if isinstance(value, Iterable) and getattr(value, "ndim", 1) != 0:
        return tuple(as_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))
    return (as_int(name, value, minimum),)
