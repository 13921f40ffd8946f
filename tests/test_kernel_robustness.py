"""Bad inputs: clear errors for invalid arguments; NaN/inf/zero tokens never crash."""

from __future__ import annotations

import pytest
import torch

import atc_patch

METHODS = ["atc", "tome", "kmedoids", "dpcknn"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "agglo"}, "method must be one of .*'atc'.*'tome'"),
        ({"method": "atc", "linkage": "ward"}, "linkage must be one of .*'single'"),
        ({"method": "tome", "linkage": "single"}, "linkage applies to method='atc' only"),
        ({"r": -1}, r"r must be >= 0"),
        ({"r": 2.5}, "r must be an int"),
        ({"protected": -1}, "protected must be an int >= 0"),
        ({"protected": 11}, "exceeds the 10 tokens"),
        ({"method": "tome_sd"}, "needs the token grid"),
        ({"method": "tome_sd", "h": 3, "w": 3}, r"h \* w = 3 \* 3 != 10"),
        ({"method": "tome_sd", "h": 2, "w": 5, "protected": 1}, "use protected=0"),
        ({"method": "tome_sd", "h": 2, "w": 5, "sx": 0}, "sx must be an int >= 1"),
        ({"method": "dpcknn", "k": 0}, "k must be an int >= 1"),
        ({"method": "kmedoids", "iters": 0}, "iters must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    kwargs = {"r": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        atc_patch.cluster_tokens(torch.randn(2, 10, 4), **kwargs)


@pytest.mark.parametrize("bad", [torch.randn(10, 4), torch.randn(1, 2, 10, 4), "tokens"])
def test_bad_shapes(bad) -> None:
    with pytest.raises(ValueError, match=r"metric must be a \(B, N, C\) tensor"):
        atc_patch.cluster_tokens(bad, r=2)


def test_integer_metric_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        atc_patch.cluster_tokens(torch.ones(1, 5, 3, dtype=torch.long), r=2)


def test_r_is_clamped_to_what_the_method_can_remove() -> None:
    metric = torch.randn(2, 11, 4)
    assert atc_patch.cluster_tokens(metric, r=100, protected=1).num_out == 2
    assert atc_patch.cluster_tokens(metric, r=100, method="tome", protected=1).num_out == 6
    sd = atc_patch.cluster_tokens(torch.randn(1, 16, 4), r=100, method="tome_sd", h=4, w=4)
    assert sd.num_out == 4  # one destination per 2x2 window survives


@pytest.mark.parametrize("method", METHODS)
def test_nan_inf_and_zero_tokens(method: str) -> None:
    """Defined behaviour: non-finite entries count as 0, zero tokens have cosine distance 1."""
    metric = torch.randn(2, 20, 6)
    metric[0, 3] = float("nan")
    metric[0, 4, 2] = float("inf")
    metric[0, 5, 1] = -float("inf")
    metric[1, 6:12] = 0.0
    metric[1, 0] = float("nan")  # a protected token, too
    plan = atc_patch.cluster_tokens(metric, r=8, method=method, protected=1)
    labels = plan.labels
    assert plan.num_out == 12
    for row in labels:
        assert row.unique().numel() == 12 and int(row.max()) == 11
    # identical after sanitising: the NaN token equals an all-zero token
    clean = metric.clone()
    clean[0, 3] = 0.0
    clean[0, 4, 2] = 0.0
    clean[0, 5, 1] = 0.0
    clean[1, 0] = 0.0
    ref = atc_patch.cluster_tokens(clean, r=8, method=method, protected=1)
    assert torch.equal(labels, ref.labels)


def test_all_zero_metric() -> None:
    plan = atc_patch.cluster_tokens(torch.zeros(3, 16, 4), r=5, linkage="single")
    assert plan.num_out == 11
    for row in plan.labels:
        assert row.unique().numel() == 11
