"""Precision health warnings, driven by synthetic train-record sequences and faked plans and GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from launcher.analysis.health import PrecisionHealth, initial_search_steps
from launcher.plan.hardware import Gpu, Hardware
from tests.plans import V100, GiB, make_plan

MIXED = Hardware(
    gpus=(Gpu(0, "Tesla T4", (7, 5), 16 * GiB), Gpu(1, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB))
)
EVERY = 10  # logging.every_steps of the synthetic runs


def records(
    skips: set[int], scale_at: dict[int, float] | None = None, steps: int = 400
) -> list[dict[str, Any]]:
    """One train record per EVERY steps; `skips` are skipped steps, `scale_at` step -> new loss scale."""
    out, skipped, scale, in_interval = [], 0, 65536.0, 0
    for step in range(1, steps + 1):
        if step in skips:
            skipped += 1
            in_interval += 1
        scale = (scale_at or {}).get(step, scale)
        if step % EVERY == 0:
            out.append(
                {
                    "kind": "train",
                    "step": step,
                    "loss": 3.0,
                    "loss_scale": scale,
                    "skipped_steps": skipped,
                    "overflow_rate": in_interval / EVERY,
                }
            )
            in_interval = 0
    return out


def run(health: PrecisionHealth, recs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, warning) for every warning, calling check once per interval as the Meter does."""
    return [(r["step"], w) for r in recs for w in health.check(r)]


def test_a_healthy_fp16_run_is_quiet() -> None:
    # The initial search halves 65536 down to 4096 (8 skips at hysteresis 2), then the scaler
    # probes a doubled scale every ~100 steps and skips two steps each time: all normal.
    search = set(range(1, 9))
    probes = {s for start in (120, 230, 340) for s in (start, start + 1)}
    scale = {2 * i: 65536.0 / 2**i for i in range(1, 5)} | {
        119: 8192.0,
        121: 4096.0,
        229: 8192.0,
        231: 4096.0,
    }
    assert run(PrecisionHealth(make_plan()), records(search | probes, scale)) == []


def test_overflow_rate_over_threshold_warns_once_per_check_not_per_step() -> None:
    # From step 100 on, every 10th step overflows (10 %): one warning per 50-step block.
    skips = set(range(100, 401, 10))
    warnings = run(PrecisionHealth(make_plan(hardware=V100)), records(skips))
    assert warnings
    assert all("overflowed in fp16" in w for _, w in warnings)
    steps = [s for s, _ in warnings]
    assert len(steps) == len(set(steps))  # at most one overflow warning per check
    assert all(b - a >= 50 for a, b in zip(steps, steps[1:], strict=False))
    assert "5 of the last 50 steps" in warnings[-1][1]


def test_overflow_rate_under_the_threshold_does_not_warn() -> None:
    skips = set(range(100, 401, 25))  # 2 in every 50-step block: 4 %
    assert run(PrecisionHealth(make_plan(hardware=V100)), records(skips)) == []


def test_custom_threshold() -> None:
    skips = set(range(100, 401, 25))
    warnings = run(PrecisionHealth(make_plan(hardware=V100), overflow_threshold=0.03), records(skips))
    assert warnings
    assert all("2 of the last 50 steps" in w and "(4%)" in w for _, w in warnings)


def test_the_initial_scale_search_is_not_judged() -> None:
    plan = make_plan()  # initial 2^16, min 1, hysteresis 2: up to 32 steps of search
    assert initial_search_steps(plan) == 32
    skips = set(range(1, 31))  # 30 skips in a row at the start, then clean
    assert run(PrecisionHealth(plan), records(skips)) == []


def test_overflows_right_after_the_search_are_judged() -> None:
    plan = make_plan(hardware=V100)
    skips = set(range(1, 31)) | set(range(41, 401, 4))  # 25 % from step 41 on
    warnings = run(PrecisionHealth(plan), records(skips))
    assert warnings[0][0] == 90  # first block: steps 40..90


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, 32),
        ({"initial": 1024.0, "min": 1.0, "hysteresis": 1}, 10),
        ({"dynamic": False, "initial": 128.0}, 0),
    ],
)
def test_initial_search_steps(settings: dict[str, Any], expected: int) -> None:
    # A static scale needs DeepSpeed (accelerate's GradScaler only scales dynamically).
    assert initial_search_steps(make_plan(backend="deepspeed", **settings)) == expected


def falling_scale(every: int) -> dict[int, float]:
    """The scale halves every `every` steps from step 100 on."""
    return {s: 65536.0 / 2 ** ((s - 100) // every + 1) for s in range(100, 401)}


def test_a_scale_that_keeps_falling_warns_after_three_falling_checks() -> None:
    warnings = run(
        PrecisionHealth(make_plan(hardware=V100)), records(set(range(100, 401, 40)), falling_scale(40))
    )
    falling = [(s, w) for s, w in warnings if "keeps falling" in w]
    assert falling
    # Blocks: 40-90, 90-140, 140-190, 190-240: the scale fell in the last three of them.
    assert falling[0][0] == 240
    assert "3 checks in a row" in falling[0][1]


def test_a_single_drop_then_a_stable_scale_does_not_warn_about_falling() -> None:
    scale = {150: 32768.0, 151: 16384.0}
    warnings = run(PrecisionHealth(make_plan(hardware=V100)), records({150, 151}, scale))
    assert not [w for _, w in warnings if "keeps falling" in w]


def test_bf16_is_suggested_once_on_a_gpu_that_has_it() -> None:
    skips = set(range(100, 401, 5))
    warnings = run(PrecisionHealth(make_plan()), records(skips))
    advice = [w for _, w in warnings if "precision.dtype=bf16" in w]
    assert len(advice) == 1
    assert len([w for _, w in warnings if "overflowed" in w]) > 1


@pytest.mark.parametrize("hardware", [V100, MIXED], ids=["V100", "T4+A100"])
def test_bf16_is_not_suggested_where_a_gpu_lacks_it(hardware: Hardware) -> None:
    warnings = run(PrecisionHealth(make_plan(hardware=hardware)), records(set(range(100, 401, 5))))
    assert warnings
    assert not [w for _, w in warnings if "bf16" in w]


def test_bf16_is_not_suggested_without_a_problem() -> None:
    assert run(PrecisionHealth(make_plan()), records(set())) == []


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_only_fp16_runs_are_judged(dtype: str) -> None:
    recs = [dict(r, loss_scale=None) for r in records(set(range(1, 401, 2)))]
    assert run(PrecisionHealth(make_plan(dtype)), recs) == []


def test_health_never_probes_gpus_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe() -> Hardware:
        raise AssertionError("the plan decided bf16 support; health must not probe GPUs again")

    monkeypatch.setattr(Hardware, "probe", staticmethod(no_probe))
    assert PrecisionHealth(make_plan()).bf16_available  # the A100 plan's policy says bf16
    plan = make_plan(hardware=Hardware(cpu_count=4))
    warnings = run(PrecisionHealth(plan), records(set(range(100, 401, 5))))
    assert warnings
    assert not [w for _, w in warnings if "bf16" in w]


def test_eval_and_event_records_are_ignored() -> None:
    health = PrecisionHealth(make_plan())
    assert health.check({"kind": "eval", "step": 100, "eval_loss": 2.0}) == []
    assert health.check({"kind": "event", "step": 100, "event": "overflow", "message": "m"}) == []
