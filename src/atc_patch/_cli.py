"""argparse value types shared by the command-line tools (the demo, examples, benchmarks).

argparse turns the ``ArgumentTypeError`` these raise into a usage error naming the flag.
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
