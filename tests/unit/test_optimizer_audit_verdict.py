"""The optimizer audit's events as the light side builds and judges them (launcher.analysis.health,
launcher.analysis.compare): their causes, the tolerance of Adam's first update, and parity's verdict."""

from __future__ import annotations

import dataclasses

import pytest

from launcher.analysis.compare import compare
from launcher.analysis.health import (
    FIRST_UPDATE_EVENT,
    FIRST_UPDATE_TOLERANCE,
    STEPS_EVENT,
    first_update_event,
    step_counter_event,
)
from launcher.rundir.metrics_log import Metrics

SETUP = "backend=deepspeed zero.stage=0 precision.dtype=bf16"


def test_counters_ahead_name_the_pre_step_and_counters_behind_the_missing_gradients() -> None:
    event, message, fields = step_counter_event(200, 200, {201: 42}, SETUP)
    assert event == STEPS_EVENT
    assert message.startswith(
        "warning: step 200: optimizer audit: the optimizer's step counters are not the 200"
    )
    assert "(42 states at 201)" in fields["cause"]
    assert "pre-step" in fields["remedy"]
    assert SETUP in fields["remedy"]
    assert fields["expected"] == 200
    assert fields["counters"] == {"201": 42}
    _, _, behind = step_counter_event(10, 10, {10: 3, 9: 1}, SETUP)
    assert "1 state at 9, 3 states at 10" in behind["cause"]
    assert "no gradient" in behind["cause"]


@pytest.mark.parametrize("off", [0.0, 0.9, -0.9, 1.1, -1.1])
def test_a_first_update_within_tolerance_is_no_event(off: float) -> None:
    event = first_update_event(1.0 + off * FIRST_UPDATE_TOLERANCE, 1000, 1e-4, (0.9, 0.95), SETUP)
    assert (event is None) == (abs(off) < 1)


def test_adam_one_step_ahead_is_an_event_with_the_value_its_betas_predict() -> None:
    event, message, fields = first_update_event(0.7349, 1000, 1e-4, (0.9, 0.95), SETUP)
    assert event == FIRST_UPDATE_EVENT
    assert "by 0.735 x lr" in message
    assert "moves 0.735 x lr at betas 0.9/0.95" in message
    _, message, _ = first_update_event(0.744, 1000, 1e-4, (0.9, 0.999), SETUP)
    assert "moves 0.744 x lr at betas 0.9/0.999" in message


def test_parity_fails_on_an_audit_event_in_either_run() -> None:
    train = tuple({"kind": "train", "step": s, "loss": 2.0, "samples_per_s": 10.0} for s in (1, 2))
    clean = Metrics(train, (), (), ())
    _, message, fields = step_counter_event(1, 1, {2: 4}, SETUP)
    audited = dataclasses.replace(
        clean, events=({"kind": "event", "step": 1, "event": STEPS_EVENT, "message": message, **fields},)
    )
    assert compare(clean, clean, "bf16", 2, 0.02).passed
    for fp32, mixed, name in ((audited, clean, "fp32"), (clean, audited, "bf16")):
        result = compare(fp32, mixed, "bf16", 2, 0.02)
        assert not result.passed
        assert result.final_rel_diff == 0
        assert result.problems == (f"optimizer audit of the {name} run, step 1: {fields['cause']}",)
        assert result.lines()[-1].startswith(
            f"FAIL: bf16 vs fp32: optimizer audit of the {name} run, step 1:"
        )
