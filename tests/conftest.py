"""Shared test helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def same_partition(a, b) -> bool:
    """True when label vectors ``a`` and ``b`` describe the same partition (names may differ)."""
    a = np.asarray(a).ravel().tolist()
    b = np.asarray(b).ravel().tolist()
    pairs = set(zip(a, b))
    return len(a) == len(b) and len(pairs) == len(set(a)) == len(set(b))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device the suite can run on here: the CPU, and CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = usefixtures("one_thread")``),
    restored afterwards: small models gain nothing from threads and lose to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
