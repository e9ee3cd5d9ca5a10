"""Nothing lost, nothing silent: one run per directory, hangs reported, errors that survive a full disk.

The run tests drive `mplaunch` as a user would, on the tiny recipe with 2 CPU ranks; the
faults come from tests/hang_model.py through `model.target`. The lock, the hang rule and the
error classification alone are tested in tests/unit/test_run_guard.py.
"""

from __future__ import annotations

import json
import platform
import signal
import time
from pathlib import Path

import pytest

from launcher.rundir.lock import Holder, RunLock
from tests.runs import (
    FAST,
    dead_pid,
    explain,
    faulty_recipe,
    mplaunch,
    records,
    start,
    wait_for_step,
    write_recipe,
)


def _report(run_dir: Path) -> str:
    result = mplaunch("report", str(run_dir), "--out", str(run_dir.parent / f"{run_dir.name}-plots"))
    assert result.returncode == 0, explain(result)
    return result.stdout


@pytest.mark.slow
def test_the_same_recipe_started_twice_runs_once(tmp_path: Path) -> None:
    # 2 x 0.25 s a step: the first run trains on for 20 s after step 1, far longer than the
    # second start takes to be refused, however loaded the machine.
    recipe = faulty_recipe(tmp_path, "twice", "sleep", 0, 1, {"train": {"max_steps": 40}}, seconds=0.25)
    run_dir = tmp_path / "runs" / "twice"
    first = start(str(recipe))
    try:
        wait_for_step(run_dir, 1, first)
        plan_before = (run_dir / "plan.json").read_text()
        second = mplaunch(str(recipe), timeout=120)
        assert first.poll() is None, (
            "the first run ended before the second was refused; the test proves nothing"
        )
        assert second.returncode == 2, explain(second)
        assert f"pid {first.pid} on {platform.node()}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert (run_dir / "plan.json").read_text() == plan_before
        assert not list(run_dir.glob("metrics-*.jsonl")), "the second start archived the live run's metrics"
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 41))
    assert (run_dir / "FINISHED").exists()
    assert (run_dir / ".lock").read_text() == ""


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_dry_runs_take_no_lock(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "stale", FAST, {"train": {"max_steps": 2}})
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    held = RunLock.acquire(run_dir / ".lock")
    try:  # a dry run and check read the directory only: a live holder does not stop them
        assert mplaunch(str(recipe), "--dry-run").returncode == 0
        assert mplaunch("check", str(recipe)).returncode == 0
    finally:
        held.release()
    dead = dead_pid()
    (run_dir / ".lock").write_text(Holder(platform.node(), dead, time.time() - 60).to_json())
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    taken = [line for line in result.stderr.splitlines() if "stale lock" in line]
    assert len(taken) == 1 and f"pid {dead} on {platform.node()}" in taken[0], result.stderr


@pytest.mark.slow
def test_a_hung_rank_is_named_with_its_stack_and_stopped(tmp_path: Path) -> None:
    recipe = faulty_recipe(tmp_path, "hang", "hang", 1, 3, {"launch": {"hang_timeout": 10}})
    run_dir = tmp_path / "runs" / "hang"
    began = time.monotonic()
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    headline = [line for line in result.stderr.splitlines() if "the run hung" in line]
    assert len(headline) == 1, result.stderr
    assert "launch.hang_timeout=10" in headline[0]
    assert "rank 1 in step 3 for" in headline[0] and "hang_model.py" in headline[0], headline
    assert str(run_dir / "logs" / "rank-1.stack") in headline[0]
    assert "in forward" in (run_dir / "logs" / "rank-1.stack").read_text()
    assert time.monotonic() - began < 240
    errors = [e for e in records(run_dir, "event") if e["event"] == "error"]
    assert len(errors) == 1 and "the run hung" in errors[0]["message"]
    assert "crashed (at step 2: the run hung" in _report(run_dir)


@pytest.mark.slow
def test_ctrl_c_during_a_hang_escalates_after_the_grace(tmp_path: Path) -> None:
    recipe = faulty_recipe(
        tmp_path, "stuck", "hang", 1, 3, {"launch": {"hang_timeout": 600, "stop_grace": 5}}
    )
    run_dir = tmp_path / "runs" / "stuck"
    proc = start(str(recipe))
    try:
        wait_for_step(run_dir, 2, proc)
        time.sleep(1)  # into step 3, where rank 1 hangs
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert time.monotonic() - asked < 60, "the grace is 5 s; stacks and SIGKILL take seconds more"
    assert "they get 5s (launch.stop_grace=5)" in err
    verdict = [line for line in err.splitlines() if "did not stop within 5s of SIGINT" in line]
    assert len(verdict) == 1, err
    assert "rank 1 (last step 2" in verdict[0] and "hang_model.py" in verdict[0]
    assert "in forward" in (run_dir / "logs" / "rank-1.stack").read_text()


@pytest.mark.slow
def test_the_failing_rank_wins_the_headline_over_its_peers_connection_error(tmp_path: Path) -> None:
    # Rank 0 leaves the process group (rank 1 then fails with "connection closed by peer")
    # and reports its own error a few seconds later.
    recipe = faulty_recipe(tmp_path, "cause", "leave", 0, 3)
    run_dir = tmp_path / "runs" / "cause"
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    headline = [line for line in result.stderr.splitlines() if "the run failed" in line]
    assert headline == ["mplaunch: the run failed on rank-0: RuntimeError: rank 0's own error"], result.stderr
    assert "rank 1: error" not in result.stderr  # the peers' lines are captured, not echoed
    errors = [e for e in records(run_dir, "event") if e["event"] == "error"]
    assert [e["message"] for e in errors] == ["the run failed on rank-0: RuntimeError: rank 0's own error"]
    assert "crashed (at step 2: the run failed on rank-0" in _report(run_dir)


@pytest.mark.slow
def test_no_space_left_on_a_data_file_is_said_with_its_path(tmp_path: Path) -> None:
    """ENOSPC raised by user code (a simulated full disk; the tmpfs test below is the real one)."""
    recipe = faulty_recipe(tmp_path, "enospc", "enospc", 1, 3)
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    assert "the run failed on rank-1: no space left on device: /data/shard-7.bin (" in result.stderr
    assert "bytes free)" in result.stderr


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_said_and_the_earlier_checkpoint_kept(
    tmp_path: Path, tiny_disk: Path
) -> None:
    recipe = write_recipe(
        tmp_path, "full", FAST, {"checkpoint": {"dir": str(tiny_disk / "ckpt"), "every_steps": 2, "keep": 3}}
    )
    run_dir = tmp_path / "runs" / "full"
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    headline = [line for line in result.stderr.splitlines() if "the run failed" in line]
    assert len(headline) == 1, result.stderr
    assert "no space left on device: " in headline[0] and str(tiny_disk / "ckpt") in headline[0], headline
    assert "bytes free)" in headline[0]
    assert sorted(p.name for p in (tiny_disk / "ckpt" / "full").glob("step-????????")) == ["step-00000002"]
    manifest = json.loads((tiny_disk / "ckpt" / "full" / "step-00000002" / "manifest.json").read_text())
    assert manifest["step"] == 2
    errors = [e for e in records(run_dir, "event") if e["event"] == "error"]
    assert len(errors) == 1 and "no space left on device" in errors[0]["message"]
