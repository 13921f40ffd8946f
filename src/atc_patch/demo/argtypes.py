"""argparse value types of the command-line tools (the demo, the examples, the benchmarks).

argparse turns the ``ArgumentTypeError`` these raise into a usage error naming the flag::

    parser.add_argument("--runs", type=positive_int, default=5)
"""

from __future__ import annotations

import argparse


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, got {text!r}"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (``--threads``, ``--batch_size``, ``--runs`` ...)."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    return _int(text, 0)


def kernel_threads_policy(text: str) -> str | int:
    """``--kernel_threads``: ``auto``, ``torch`` or an int >= 1 (see
    :func:`atc_patch.set_kernel_threads`)."""
    if text in ("auto", "torch"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be auto, torch or an int >= 1, got {text!r}")


def keep_rate(text: str) -> float:
    """A keep rate in (0, 1] (``--keep_rate``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def fraction(text: str) -> float:
    """A fraction in [0, 1) (``--throw_out``: the share of runs discarded as warm-up)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value
