"""The kernel's reusable CPU buffers: results never depend on them and never alias them."""

from __future__ import annotations

import threading

import pytest
import torch

import atc_patch
from atc_patch.kernel.scratch import release_workspace, scratch, workspace_bytes

LINKAGES = ["single", "complete", "average"]


@pytest.mark.parametrize("linkage_name", LINKAGES)
def test_reused_buffers_give_the_same_labels(linkage_name: str) -> None:
    big, small = torch.randn(3, 120, 16), torch.randn(2, 40, 16)
    release_workspace()
    cold = atc_patch.cluster_tokens(small, r=17, linkage=linkage_name).labels
    first = atc_patch.cluster_tokens(big, r=50, linkage=linkage_name).labels
    kept = first.clone()
    warm = atc_patch.cluster_tokens(small, r=17, linkage=linkage_name).labels  # big buffers
    assert torch.equal(cold, warm)
    assert torch.equal(first, kept)  # the first result is not a view of the buffers


def test_release_frees_the_buffers() -> None:
    atc_patch.cluster_tokens(torch.randn(2, 100, 8), r=40)
    assert workspace_bytes() > 0
    atc_patch.release_workspace()
    assert workspace_bytes() == 0


def test_buffers_are_per_thread() -> None:
    """Concurrent calls (threads, DataParallel-style replicas) never share buffers."""
    release_workspace()
    seen: dict[str, int] = {}

    def work() -> None:
        atc_patch.cluster_tokens(torch.randn(1, 64, 8), r=20)
        seen["other"] = workspace_bytes()
        release_workspace()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["other"] > 0 and workspace_bytes() == 0


def test_scratch_grows_and_reuses() -> None:
    release_workspace()
    a = scratch("t", (4, 5), torch.float32, torch.device("cpu"))
    b = scratch("t", (2, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()  # the smaller request reuses the buffer
    c = scratch("t", (10, 10), torch.float32, torch.device("cpu"))
    assert c.shape == (10, 10) and workspace_bytes() == 400
    release_workspace()
