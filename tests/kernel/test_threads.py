"""The kernel's intra-op threads (issue 10.15): one thread for the calling thread only while the
machine is oversubscribed, restored afterwards; other threads and results are unaffected."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import atc_patch
from atc_patch.kernel import atc, threads

pytestmark = pytest.mark.skipif(
    threads._omp() is None, reason="needs torch's OpenMP runtime (Linux wheels)"
)


@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads and the policy reset, whatever the test runner set."""
    before, policy = torch.get_num_threads(), threads.get_kernel_threads()
    torch.set_num_threads(2)
    threads._busy_cache[:] = [-1.0, False]
    yield
    torch.set_num_threads(before)
    threads.set_kernel_threads(policy)
    threads._busy_cache[:] = [-1.0, False]


def _spy_rounds(monkeypatch) -> dict:
    """Record torch's thread count inside the ATC rounds, here and in another thread."""
    seen: dict = {}
    rounds = atc._rnn_rounds

    def spy(*args, **kwargs):
        seen["inside"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
        other.start()
        other.join()
        return rounds(*args, **kwargs)

    monkeypatch.setattr(atc, "_rnn_rounds", spy)
    return seen


@pytest.mark.parametrize("busy", [True, False])
def test_auto_limits_only_when_oversubscribed(two_threads, monkeypatch, busy: bool) -> None:
    monkeypatch.setattr(threads, "_running_outside", lambda: 64 if busy else 0)
    seen = _spy_rounds(monkeypatch)
    metric = torch.randn(4, 50, 8)
    labels = atc_patch.cluster_tokens(metric, 20).labels
    assert seen["inside"] == (1 if busy else 2)
    assert seen["other"] == 2  # another thread keeps torch's setting meanwhile
    assert torch.get_num_threads() == 2  # restored
    threads.set_kernel_threads("torch")
    assert torch.equal(atc_patch.cluster_tokens(metric, 20).labels, labels)


def test_torch_policy_and_int_policy(two_threads, monkeypatch) -> None:
    monkeypatch.setattr(threads, "_running_outside", lambda: 64)
    seen = _spy_rounds(monkeypatch)
    threads.set_kernel_threads("torch")
    atc_patch.cluster_tokens(torch.randn(2, 30, 8), 10)
    assert seen["inside"] == 2
    monkeypatch.setattr(threads, "_running_outside", lambda: 0)
    threads.set_kernel_threads(1)
    atc_patch.cluster_tokens(torch.randn(2, 30, 8), 10)
    assert seen["inside"] == 1 and torch.get_num_threads() == 2


def test_restored_after_an_error(two_threads, monkeypatch) -> None:
    threads.set_kernel_threads(1)

    def fail(*args, **kwargs):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")

    monkeypatch.setattr(atc, "_rnn_rounds", fail)
    with pytest.raises(RuntimeError, match="boom"):
        atc_patch.cluster_tokens(torch.randn(2, 30, 8), 10)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("method", ["tome", "kmedoids", "dpcknn"])
def test_other_methods_follow_the_policy(two_threads, monkeypatch, method: str) -> None:
    threads.set_kernel_threads(1)
    seen = {}
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(
        torch.Tensor,
        "__matmul__",
        lambda a, b: seen.setdefault("inside", torch.get_num_threads()) and matmul(a, b),
    )
    atc_patch.cluster_tokens(torch.randn(2, 30, 8), 10, method=method)
    assert seen["inside"] == 1 and torch.get_num_threads() == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_load_check_reads_the_machine() -> None:
    outside = threads._running_outside()
    assert isinstance(outside, int)  # a snapshot: may be off by our own threads changing state


@pytest.mark.parametrize("bad", ["fast", 0, -1, 1.5, True])
def test_bad_policy(bad) -> None:
    with pytest.raises(ValueError, match=r"policy must be one of \('auto', 'torch'\)"):
        threads.set_kernel_threads(bad)
