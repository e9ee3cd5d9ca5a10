"""The accelerate backend's loss scaler follows DeepSpeed's rules step for step."""

from __future__ import annotations

import pytest

from launcher.plan.loss_scale import DynamicScale, ScaleAtMinimum


def _ours(initial: float, window: int, min_scale: float, hysteresis: int, consecutive: bool) -> DynamicScale:
    return DynamicScale(initial, window, min_scale, hysteresis, consecutive)


def test_hysteresis_then_halving_then_growth() -> None:
    s = _ours(2.0**16, window=3, min_scale=1.0, hysteresis=2, consecutive=False)
    s.update(True)  # first overflow only uses up the hysteresis
    assert s.scale == 2.0**16
    s.update(True)
    assert s.scale == 2.0**15
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**15
    s.update(False)
    # DeepSpeed counts the window from the step after the overflow's successor.
    assert s.scale == 2.0**16


def test_floor_is_kept_and_an_overflow_there_stops() -> None:
    s = _ours(4.0, window=1000, min_scale=2.0, hysteresis=1, consecutive=False)
    s.update(True)
    assert s.scale == 2.0
    with pytest.raises(ScaleAtMinimum, match="minimum loss scale 2"):
        s.update(True)


def test_static_scale_never_moves() -> None:
    s = DynamicScale(128.0, 1, 1.0, 1, False, dynamic=False)
    for overflow in (True, True, False, False, True):
        s.update(overflow)
    assert s.scale == 128.0
