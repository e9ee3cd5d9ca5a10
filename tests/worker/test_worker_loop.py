"""`train.fit` in one process with a fake backend: no torch.distributed, no model, seconds in all.

The loop's contract: a stop request checkpoints and then exits; evaluation runs every
train.eval_every steps; a skipped fp16 step is an "overflow" event; a non-finite loss
stops the run before a checkpoint is sealed; a restore resumes at the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from launcher.plan.resolve import Plan
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.worker import data, ranks, train
from launcher.worker.metrics import NonFiniteLoss
from tests.fake_loop import FakeBackend, loop_run, small_plan


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(small_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _events(plan: Plan) -> list[tuple[str, int]]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [(r["event"], r["step"]) for r in map(json.loads, lines) if r["kind"] == "event"]


def _records(plan: Plan, kind: str) -> list[dict[str, Any]]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _sealed(plan: Plan) -> list[int]:
    return RunDir.from_plan(plan).checkpoint_steps()


def test_a_stop_request_checkpoints_then_exits_and_a_restore_resumes_there(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = small_plan(tmp_path)
    stop = SimpleNamespace(signal=None)
    backend = FakeBackend(on_step=lambda n: setattr(stop, "signal", signal.SIGTERM) if n == 3 else None)
    r = loop_run(plan, tokens, backend, stop)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert [c for c in backend.calls if c[0] != "eval"] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("save", 3),
    ]
    assert [e for e in _events(plan) if e[0] in ("checkpoint", "stop", "finish")] == [
        ("checkpoint", 3),
        ("stop", 3),
    ]
    assert _sealed(plan) == [3]
    assert RunDir.from_plan(plan).finished_step() is None

    again = FakeBackend()
    r = loop_run(plan, tokens, again)
    try:
        assert r.start == 3
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert again.calls[0] == ("load", checkpoint.step_dir(r.ckpt.root, 3).name)
    assert [c for c in again.calls if c[0] == "train"] == [("train", 4), ("train", 5), ("train", 6)]
    assert ("resume", 3) in _events(plan)
    assert _events(plan)[-1] == ("finish", 6)
    assert _sealed(plan) == [3, 6]
    assert RunDir.from_plan(plan).finished_step() == 6


def test_eval_cadence_checkpoint_cadence_and_overflow_events(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=4", "train.max_steps=8")
    backend = FakeBackend(skipped=(2, 5))
    r = loop_run(plan, tokens, backend)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert [e["step"] for e in _records(plan, "eval")] == [2, 4, 6, 8]
    assert [c for c in backend.calls if c[0] == "eval"] == [
        ("eval", 2),
        ("eval", 4),
        ("eval", 6),
        ("eval", 8),
    ]
    overflows = [r for r in _records(plan, "event") if r["event"] == "overflow"]
    assert [(o["step"], o["loss_scale"]) for o in overflows] == [(2, 512.0), (5, 512.0)]
    assert [c[1] for c in backend.calls if c[0] == "save"] == [4, 8]
    assert _sealed(plan) == [4, 8]


@pytest.mark.parametrize("log_every", [1, 10])
def test_a_non_finite_loss_stops_before_a_checkpoint_is_sealed(
    tmp_path: Path, tokens: data.Tokens, log_every: int
) -> None:
    # Logged every step, the record of step 3 catches it; logged rarely, the save at step 4 does.
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", f"logging.every_steps={log_every}")
    backend = FakeBackend(losses={3: math.nan})
    r = loop_run(plan, tokens, backend)
    try:
        with pytest.raises(NonFiniteLoss):
            train.fit(r)
    finally:
        r.meter.close()
    assert [c[1] for c in backend.calls if c[0] == "save"] == [2]
    assert _sealed(plan) == [2]
    assert not list(RunDir.from_plan(plan).checkpoints.glob(".tmp-*"))
    assert RunDir.from_plan(plan).finished_step() is None


def _agree(rank: int, init: str, flags: list[list[bool]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    agreement = ranks.StopAgreement(ranks.Dist(rank, 2, rank, None))
    seen = [agreement.step(flag) for flag in flags[rank]]
    agreement.close()
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(seen))


def test_ranks_agree_to_stop_at_the_same_step_one_step_after_a_flag(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # Rank 1 is signalled during step 3 (index 2); rank 0 never is.
    flags = [[False] * 6, [False, False, True, True, True, True]]
    out = str(tmp_path / "seen")
    mp.spawn(_agree, args=(f"file://{tmp_path / 'rendezvous'}", flags, out), nprocs=2, join=True)
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] == [False, False, False, True, True, True]
    single = ranks.StopAgreement(ranks.Dist(0, 1, 0, None))
    assert [single.step(f) for f in (False, True)] == [False, True]  # one rank: at once
