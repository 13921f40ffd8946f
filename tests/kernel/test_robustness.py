"""Bad inputs: clear errors for invalid arguments; NaN/inf/zero tokens never crash."""

from __future__ import annotations

import numpy as np
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
        ({"r": 2.5}, "r must be an integer .*integral float.*got the non-integral 2.5"),
        ({"r": True}, r"r must be an integer \(an int, a numpy integer"),
        ({"r": "3"}, "r must be an integer"),
        ({"r": torch.tensor(True)}, "r must be an integer"),
        ({"r": torch.tensor([3])}, "r must be an integer .*array of shape"),
        ({"r": np.float64(2.5)}, "non-integral"),
        ({"protected": -1}, "protected must be >= 0"),
        ({"protected": 1.5}, "protected must be an integer"),
        ({"protected": 11}, "exceeds the 10 tokens"),
        ({"method": "tome_sd"}, "needs the token grid"),
        ({"method": "tome_sd", "h": 3, "w": 3}, r"grid 3 x 3 = 9 tokens, but metric has 10"),
        ({"method": "tome_sd", "h": 2}, "give both h and w"),
        ({"method": "tome_sd", "h": 2, "w": 5, "grid": (2, 5)}, "not both"),
        ({"method": "tome_sd", "h": 2, "w": 5, "protected": 1}, "use protected=0"),
        ({"method": "tome_sd", "h": 2, "w": 5, "sx": 0}, "sx must be >= 1"),
        ({"method": "tome_sd", "h": 2, "w": 5, "st": 2}, r"st .* needs a 3-D grid"),
        ({"method": "tome_sd", "grid": (2, 5), "tile": (1, 1)}, "takes no tile"),
        ({"method": "tome_sd", "grid": (2, 5), "mask": torch.ones(2, 10)}, "takes no mask"),
        ({"method": "atc", "sx": 2}, "sx applies to method='tome_sd' only"),
        ({"method": "atc", "h": 2, "w": 5}, "h applies to method='tome_sd' only"),
        ({"method": "tome", "no_rand": True}, "no_rand applies to method='tome_sd' only"),
        ({"method": "atc", "k": 3}, "k applies to method='dpcknn' only"),
        ({"method": "dpcknn", "iters": 3}, "iters applies to method='kmedoids' only"),
        ({"method": "dpcknn", "k": 0}, "k must be >= 1"),
        ({"method": "kmedoids", "iters": 0}, "iters must be >= 1"),
        ({"grid": (3, 3)}, r"grid 3 x 3 = 9 tokens, but metric has 10 tokens"),
        ({"grid": (2, 2, 2, 2)}, r"grid must be \(h, w\) or \(t, h, w\)"),
        ({"grid": "2x5"}, r"grid must be \(h, w\)"),
        ({"grid": (2, 5.5)}, r"grid\[1\] must be an integer"),
        ({"tile": (2, 2)}, "tile needs the token grid"),
        ({"grid": (2, 5), "tile": (2,)}, "tile must have one size per grid axis"),
        ({"grid": (2, 5), "tile": (0, 2)}, r"tile\[0\] must be >= 1"),
        ({"mask": torch.ones(2, 9, dtype=torch.bool)}, r"mask must be a \(B, N\)"),
        ({"mask": torch.zeros(2, 10)}, "additive attention mask is not a token mask"),
        ({"mask": [[True] * 10] * 2}, r"mask must be a \(B, N\)"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"backend": "triton", "method": "tome"}, "applies to method='atc' only"),
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


@pytest.mark.parametrize("r", [6, np.int64(6), torch.tensor(6), 6.0, np.float32(6.0)])
def test_r_of_any_integral_type(r) -> None:
    """One number rule (``atc_patch._validate.as_int``): the forms ``apply_patch`` accepts."""
    metric = torch.randn(2, 20, 8)
    want = atc_patch.cluster_tokens(metric, 6)
    got = atc_patch.cluster_tokens(metric, r)
    assert got.num_out == 14 and torch.equal(got.labels, want.labels)


def test_every_integer_argument_follows_the_number_rule() -> None:
    metric = torch.randn(2, 1 + 24, 8)
    kw = {"protected": np.int64(1), "grid": (np.int64(4), 6.0), "tile": (torch.tensor(2), 3)}
    got = atc_patch.cluster_tokens(metric, torch.tensor(8), **kw)
    want = atc_patch.cluster_tokens(metric, 8, protected=1, grid=(4, 6), tile=(2, 3))
    assert torch.equal(got.labels, want.labels)
    for method, opts in (("kmedoids", {"iters": 3.0}), ("dpcknn", {"k": np.int32(3)})):
        ints = {k: int(v) for k, v in opts.items()}
        assert torch.equal(
            atc_patch.cluster_tokens(metric, 8, method, **opts).labels,
            atc_patch.cluster_tokens(metric, 8, method, **ints).labels,
        )
    sd = atc_patch.cluster_tokens(metric[:, 1:], 8, "tome_sd", h=4.0, w=np.int64(6), sx=2.0)
    assert sd.num_out == 16


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
