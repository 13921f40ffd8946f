"""The kernel's reusable CPU buffers: results never depend on them and never alias them."""

from __future__ import annotations

import threading

import pytest
import torch

import atc_patch
from atc_patch.kernel import scratch as scratch_module
from atc_patch.kernel.scratch import (
    release_workspace,
    scratch,
    set_workspace_limits,
    workspace_bytes,
)

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


def _hold_buffers_in_threads(count: int, tokens: int = 64):
    """Start ``count`` threads that each run the kernel once and then wait (keeping their
    thread-local buffers alive) until the returned event is set."""
    ready = threading.Barrier(count + 1)
    done = threading.Event()

    def work() -> None:
        atc_patch.cluster_tokens(torch.randn(1, tokens, 8), r=tokens // 3)
        ready.wait()
        done.wait()

    threads = [threading.Thread(target=work) for _ in range(count)]
    for t in threads:
        t.start()
    ready.wait()
    return threads, done


def _stop(threads, done) -> None:
    done.set()
    for t in threads:
        t.join()


def test_release_frees_every_threads_buffers() -> None:
    release_workspace()
    threads, done = _hold_buffers_in_threads(2)
    try:
        assert workspace_bytes(all_threads=True) > 0 and workspace_bytes() == 0
        release_workspace()  # from the main thread
        assert workspace_bytes(all_threads=True) == 0
    finally:
        _stop(threads, done)


def test_release_own_thread_only() -> None:
    release_workspace()
    atc_patch.cluster_tokens(torch.randn(1, 64, 8), r=20)
    threads, done = _hold_buffers_in_threads(1)
    try:
        others = workspace_bytes(all_threads=True) - workspace_bytes()
        assert others > 0 and workspace_bytes() > 0
        release_workspace(all_threads=False)
        assert workspace_bytes() == 0 and workspace_bytes(all_threads=True) == others
    finally:
        _stop(threads, done)
        release_workspace()


def _holding() -> int:
    """Threads that hold kernel buffers now."""
    return sum(1 for ws in list(scratch_module._all) if ws.buffers)


def test_thread_pool_keeps_at_most_max_threads() -> None:
    release_workspace()
    previous = set_workspace_limits(max_threads=2)
    try:
        threads, done = _hold_buffers_in_threads(5)
        try:
            assert _holding() == 2
            atc_patch.cluster_tokens(torch.randn(1, 64, 8), r=20)  # the main thread's turn
            assert workspace_bytes() > 0 and _holding() == 2  # the newest thread keeps its own
        finally:
            _stop(threads, done)
    finally:
        set_workspace_limits(**previous)
        release_workspace()


def test_max_bytes_bounds_the_total() -> None:
    release_workspace()
    atc_patch.cluster_tokens(torch.randn(1, 64, 8), r=20)
    per_thread = workspace_bytes()
    release_workspace()
    previous = set_workspace_limits(max_threads=None, max_bytes=2 * per_thread)
    try:
        threads, done = _hold_buffers_in_threads(4)
        try:
            assert workspace_bytes(all_threads=True) <= 2 * per_thread
        finally:
            _stop(threads, done)
    finally:
        set_workspace_limits(**previous)
        release_workspace()


def test_max_bytes_bounds_a_single_threaded_program() -> None:
    """``d10``: the limit holds once a call has returned, for the calling thread's own buffers
    too (``max_bytes=0``: nothing is kept); a limit above a call's needs keeps them."""
    metric = torch.randn(2, 1024, 16)
    release_workspace()
    previous = set_workspace_limits(max_threads=8, max_bytes=0)
    try:
        want = atc_patch.cluster_tokens(metric, 512).labels
        assert workspace_bytes(all_threads=True) == 0
        set_workspace_limits(max_threads=8, max_bytes=1 << 20)  # a call needs ~9 MB
        assert torch.equal(atc_patch.cluster_tokens(metric, 512).labels, want)
        assert workspace_bytes(all_threads=True) <= 1 << 20
        set_workspace_limits(max_threads=8, max_bytes=1 << 30)
        atc_patch.cluster_tokens(metric, 512)
        kept = workspace_bytes()
        assert 1 << 20 < kept <= 1 << 30
        set_workspace_limits(max_threads=8, max_bytes=kept - 1)  # no call in flight: at once
        assert workspace_bytes(all_threads=True) == 0
    finally:
        set_workspace_limits(**previous)
        release_workspace()


def test_finished_threads_leave_nothing() -> None:
    release_workspace()
    threads, done = _hold_buffers_in_threads(3)
    _stop(threads, done)
    assert workspace_bytes(all_threads=True) == 0


@pytest.mark.parametrize("bad", [{"max_threads": 0}, {"max_bytes": -1}, {"max_threads": 1.5}])
def test_bad_limits(bad: dict) -> None:
    with pytest.raises(ValueError, match="must be None or an int"):
        set_workspace_limits(**bad)


def test_release_and_eviction_never_disturb_calls_in_flight() -> None:
    """Threads cluster while the main thread keeps releasing and evicting their buffers: every
    result still equals the reference."""
    metrics = [torch.randn(2, 48 + 8 * i, 8) for i in range(4)]
    reference = [atc_patch.cluster_tokens(m, r=20).labels for m in metrics]
    previous = set_workspace_limits(max_threads=1)
    stop, errors = threading.Event(), []

    def work(i: int) -> None:
        while not stop.is_set():
            if not torch.equal(atc_patch.cluster_tokens(metrics[i], r=20).labels, reference[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(200):
            release_workspace()
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        set_workspace_limits(**previous)
        release_workspace()
    assert not errors
