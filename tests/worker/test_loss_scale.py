"""The accelerate backend's loss scaler against DeepSpeed's own, step for step."""

from __future__ import annotations

import random

import pytest

from launcher.plan.loss_scale import DynamicScale, ScaleAtMinimum


@pytest.mark.parametrize("seed", range(6))
def test_matches_deepspeeds_dynamic_loss_scaler(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # importing deepspeed sets it
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda *a, **k: 0)
    rng = random.Random(seed)
    window, hysteresis, consecutive = rng.choice([1, 2, 5]), rng.choice([1, 2, 3]), rng.random() < 0.5
    theirs = loss_scaler.DynamicLossScaler(
        init_scale=2.0**12,
        scale_window=window,
        min_scale=1.0,
        delayed_shift=hysteresis,
        consecutive_hysteresis=consecutive,
        raise_error_at_min_scale=True,
    )
    ours = DynamicScale(2.0**12, window, 1.0, hysteresis, consecutive)
    for _ in range(300):
        overflow = rng.random() < 0.3
        at_floor = overflow and theirs.cur_scale == 1.0 and (hysteresis == 1 or theirs.cur_hysteresis == 1)
        if at_floor:  # both stop here
            with pytest.raises(Exception, match="minimum"):
                theirs.update_scale(overflow)
            with pytest.raises(ScaleAtMinimum):
                ours.update(overflow)
            return
        theirs.update_scale(overflow)
        ours.update(overflow)
        assert (ours.scale, ours.hysteresis_left) == (theirs.cur_scale, theirs.cur_hysteresis)
