"""Which steps metrics.jsonl records: every logging.every_steps-th, the last, and the run's first
(`mplaunch report` starts the loss and LR curves there), through `train.fit` with a fake backend."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.plan.resolve import Plan
from launcher.rundir.layout import RunDir
from launcher.worker import data, train
from tests.fake_loop import FakeBackend, loop_run, small_plan


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(small_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _train_steps(plan: Plan) -> list[int]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _fit(plan: Plan, tokens: data.Tokens, backend: FakeBackend, stop: object = None) -> train.Run:
    r = loop_run(plan, tokens, backend, stop)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    return r


def test_the_first_step_is_logged_beside_every_tenth(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "logging.every_steps=10", "train.max_steps=25", "train.eval_every=0")
    _fit(plan, tokens, FakeBackend())
    assert _train_steps(plan) == [1, 10, 20, 25]
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    first = next(r for r in map(json.loads, lines) if r["kind"] == "train")
    # A whole record, its interval one step long: the warmup's first lr, the first loss, step 1's speed.
    assert first["lr"] > 0
    assert first["step_time_s"] > 0
    assert first["overflow_rate"] == 0.0


def test_a_resume_logs_its_intervals_only(tmp_path: Path, tokens: data.Tokens) -> None:
    """Step 1 is the run's first step, not each launch's: a resume adds no record of its own first step."""
    plan = small_plan(tmp_path, "logging.every_steps=4", "train.max_steps=10", "train.eval_every=0")
    stop = SimpleNamespace(signal=None)
    _fit(
        plan,
        tokens,
        FakeBackend(on_step=lambda n: setattr(stop, "signal", signal.SIGTERM) if n == 5 else None),
        stop,
    )
    assert _train_steps(plan) == [1, 4]
    r = _fit(plan, tokens, FakeBackend())
    assert r.start == 5
    assert _train_steps(plan) == [1, 4, 8, 10]


def test_every_step_logs_each_step_once(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "train.max_steps=3", "train.eval_every=0")
    _fit(plan, tokens, FakeBackend())
    assert _train_steps(plan) == [1, 2, 3]
