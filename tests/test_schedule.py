"""Reduction schedules shared by every family."""

from __future__ import annotations

import pytest

from atc_patch import make_schedule


def test_constant_and_list() -> None:
    assert make_schedule(r=8).per_block(4, 196) == [8, 8, 8, 8]
    assert make_schedule(r=[0, 5, 7]).per_block(4, 196) == [0, 5, 7, 0]  # padded with zeros


def test_decrease_is_tomes_parse_r_with_inflect_minus_one() -> None:
    # ToMe parse_r(12, (16, -1.0)): from 2r = 32 down to 0, int() of the linear ramp
    got = make_schedule(r=16, r_schedule="decrease").per_block(12, 196)
    assert got == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


def test_keep_rate_is_the_atc_deit_setting() -> None:
    # int(196 * 0.7 ** (j + 1)) tokens kept after the j-th location: 137, 96, 67
    got = make_schedule(keep_rate=0.7, reduction_loc=(3, 6, 9)).per_block(12, 196)
    assert got == [0, 0, 0, 59, 0, 0, 41, 0, 0, 29, 0, 0]


def test_not_clamped_across_blocks() -> None:
    """The kernel clamps each block to the tokens actually left; the schedule does not guess."""
    assert make_schedule(r=30).per_block(4, 65) == [30, 30, 30, 30]


def test_identity() -> None:
    assert make_schedule(r=0).is_identity()
    assert make_schedule(r=[0, 0]).is_identity()
    assert make_schedule(keep_rate=1.0, reduction_loc=(1,)).is_identity()
    assert not make_schedule(r=1).is_identity()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 4, "r_schedule": "linear"}, r"r_schedule must be one of \('constant', 'decrease'\)"),
        ({"r": -1}, "r must be >= 0"),
        ({"r": [1, -2]}, "r must be >= 0 in every block"),
        ({"r": 1.5}, "r must be an int"),
        ({"keep_rate": 0.7}, "keep_rate needs reduction_loc"),
        ({"keep_rate": 1.5, "reduction_loc": (1,)}, r"keep_rate must be in \(0, 1\]"),
        ({"keep_rate": 0.7, "reduction_loc": (3, 3)}, "increasing, distinct"),
        ({"r": 4, "keep_rate": 0.7, "reduction_loc": (1,)}, "either r .* or keep_rate"),
        ({"reduction_loc": (1,)}, "only used together with keep_rate"),
        ({"r": [1, 2], "r_schedule": "decrease"}, "r_schedule applies to an int r"),
    ],
)
def test_bad_schedules(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_reduction_loc_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range for a model with 4 blocks"):
        make_schedule(keep_rate=0.5, reduction_loc=(2, 4)).per_block(4, 64)
