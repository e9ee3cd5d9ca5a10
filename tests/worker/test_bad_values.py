"""The meter's bad-value checks on tensors: the first bad step found without a host sync, the loss named, fp16 skipped steps ignored."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.worker.backends import StepStats
from launcher.worker.metrics import Meter, NonFiniteGrads, NonFiniteLoss
from tests.runs import TINY


@pytest.fixture
def meter(tmp_path: Path) -> Meter:
    plan = resolve(
        load(TINY, [f"logging.dir={tmp_path}", "launch.nproc_per_node=1", "logging.tensorboard=false"]),
        Hardware(cpu_count=2),
    )
    return Meter(plan, is_rank0=False, start_step=10)


def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("Meter.record read a tensor back to the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_the_meter_marks_the_first_bad_step_without_a_host_sync(
    meter: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, nan = torch.tensor(2.0), torch.tensor(math.nan)
    with monkeypatch.context() as m:
        _no_host_reads(m)
        meter.record(StepStats(good, torch.tensor(1.0), None))  # step 11
        meter.record(StepStats(good, torch.tensor(math.inf), None))  # step 12: gradients
        meter.record(StepStats(nan, torch.tensor(math.nan), None))  # step 13: the loss too
    with pytest.raises(NonFiniteGrads, match="gradients became NaN or infinite in fp32 at step 12 while"):
        meter.check_finite()


@pytest.mark.gpu
def test_the_meter_never_waits_for_the_gpu(meter: Meter) -> None:
    loss, norm = torch.tensor(2.0, device="cuda"), torch.tensor(math.inf, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for _ in range(3):
            meter.record(StepStats(loss, norm, None))
            meter.record(StepStats(loss, 1.0, None))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(NonFiniteGrads, match="at step 11 while"):
        meter.check_finite()


def test_the_meter_names_a_bad_loss_and_ignores_fp16_skipped_steps(meter: Meter) -> None:
    meter.record(StepStats(torch.tensor(math.inf), torch.tensor(math.nan), True))  # skipped: the scaler's
    meter.check_finite()
    meter.record(StepStats(torch.tensor(math.nan), 1.0, None))
    with pytest.raises(NonFiniteLoss, match="the loss became NaN or infinite in fp32 at step 12") as exc:
        meter.check_finite()
    assert "nothing from step 12 on was saved" in str(exc.value)
