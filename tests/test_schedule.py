"""Reduction schedules shared by every family."""

from __future__ import annotations

import warnings

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


# --- targets: what a capped block leaves to the next ones (issue 10, item 3) ---------------------


def _kept(schedule, num_blocks: int, num_tokens: int, method: str, protected: int) -> list[int]:
    """Tokens left after each block, by the independent rule: a block removes what reaches its
    target (or its fixed count), never more than max_reduction allows."""
    from atc_patch.kernel import max_reduction

    free = num_tokens - protected
    targets = schedule.targets(num_blocks, free)
    asked = schedule.per_block(num_blocks, free)
    out = []
    for target, fixed in zip(targets, asked):
        want = fixed if target is None or schedule.keep_rate_mode == "reference" else free - target
        free -= max(0, min(want, max_reduction(method, free + protected, protected)))
        out.append(free)
    return out


def test_tome_after_a_capped_block_aims_at_the_targets() -> None:
    # DeiT-T, keep 0.3 @ 1, 2, 3: targets 58/17/5 of 196 patches; ToMe halves at most.
    s = make_schedule(keep_rate=0.3, reduction_loc=(1, 2, 3))
    assert s.targets(4, 196) == [None, 58, 17, 5]
    with pytest.warns(UserWarning, match="keeps 98/49/25 .* where 58/17/5 were asked"):
        rs = s.check_reachable(4, 197, "tome", protected=1)
    assert rs == [0, 98, 49, 24]
    assert [196 - sum(rs[: i + 1]) for i in range(4)] == _kept(s, 4, 197, "tome", 1)
    # ATC reaches every target, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_schedule(keep_rate=0.3, reduction_loc=(1, 2, 3)).check_reachable(
            4, 197, "atc", protected=1
        ) == [0, 138, 41, 12]


def test_reference_mode_removes_the_fixed_deltas() -> None:
    """keep_rate_mode="reference": the ATC reference code's ToMe rows (98/57/45 here)."""
    s = make_schedule(keep_rate=0.3, reduction_loc=(1, 2, 3), keep_rate_mode="reference")
    with pytest.warns(UserWarning, match="keeps 98/57/45"):
        rs = s.check_reachable(4, 197, "tome", protected=1)
    assert rs == [0, 98, 41, 12]
    assert [196 - sum(rs[: i + 1]) for i in range(4)] == _kept(s, 4, 197, "tome", 1)


def test_unreachable_target_warns_once_per_input_size() -> None:
    s = make_schedule(keep_rate=0.25, reduction_loc=(0, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            s.check_reachable(2, 65, "tome", protected=1)
        s.check_reachable(2, 33, "tome", protected=1)
    assert len(caught) == 2


@pytest.mark.parametrize("keep_rate", [0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1])
@pytest.mark.parametrize("method", ["tome", "atc"])
def test_steps_match_the_independent_rule(keep_rate: float, method: str) -> None:
    from atc_patch.schedule import simulate

    for mode in ("target", "reference"):
        s = make_schedule(keep_rate=keep_rate, reduction_loc=(0, 2, 3, 5), keep_rate_mode=mode)
        rs = simulate(s.steps(6, 196), 198, method, protected=2)
        assert [196 - sum(rs[: i + 1]) for i in range(6)] == _kept(s, 6, 198, method, 2)
    target = make_schedule(keep_rate=keep_rate, reduction_loc=(0, 2, 3, 5))
    reference = make_schedule(
        keep_rate=keep_rate, reduction_loc=(0, 2, 3, 5), keep_rate_mode="reference"
    )
    assert _kept(target, 6, 198, method, 2)[-1] <= _kept(reference, 6, 198, method, 2)[-1]


def test_lower_keep_rate_never_keeps_more() -> None:
    """The symptom of issue 10: ToMe kept 11 tokens at keep 0.4 and 14 at 0.3 (64 patches)."""
    from atc_patch.schedule import simulate

    kept = []
    for k in (0.6, 0.5, 0.4, 0.3, 0.2):
        s = make_schedule(keep_rate=k, reduction_loc=(1, 2, 3))
        kept.append(65 - sum(simulate(s.steps(4, 64), 65, "tome", protected=1)))
    assert kept == sorted(kept, reverse=True)


# --- numbers (issue 10, item 9) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": [1.9, 2.9]}, r"r\[0\] must be an integer .*got the non-integral 1.9"),
        ({"keep_rate": 0.7, "reduction_loc": (1.5, 2.7)}, "reduction_loc.* non-integral 1.5"),
        ({"keep_rate": "0.7", "reduction_loc": (1,)}, "keep_rate must be a number"),
        ({"keep_rate": True, "reduction_loc": (1,)}, "keep_rate must be a number"),
        ({"r": True}, "r must be an integer"),
        ({"r": "8"}, "r must be an integer"),
        ({"keep_rate": 0.7, "reduction_loc": (1,), "keep_rate_mode": "delta"}, "target.*reference"),
        ({"r": 4, "keep_rate_mode": "reference"}, "keep_rate_mode applies to keep_rate"),
    ],
)
def test_bad_numbers_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_integral_numbers_of_any_type_are_accepted() -> None:
    import numpy as np
    import torch

    assert make_schedule(r=4.0).r == 4 and type(make_schedule(r=4.0).r) is int
    assert make_schedule(r=np.int64(4)).r == 4 and type(make_schedule(r=np.int64(4)).r) is int
    assert make_schedule(r=torch.tensor(4)).r == 4
    assert make_schedule(r=[np.int64(1), 2.0]).r == (1, 2)
    s = make_schedule(keep_rate=np.float32(0.5), reduction_loc=3)
    assert s.reduction_loc == (3,) and type(s.keep_rate) is float
    assert make_schedule(keep_rate=0.5, reduction_loc=np.array([1, 2])).reduction_loc == (1, 2)


def test_required_schedule_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"r=\.\.\. .* keep_rate=\.\.\. with reduction_loc"):
        make_schedule(required=True)
    assert make_schedule(r=0, required=True).is_identity()
