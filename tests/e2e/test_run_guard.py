"""Nothing lost, nothing silent: one run per directory, hangs reported, errors that survive a full disk.

The run tests drive `mplaunch` as a user would, on the tiny recipe with 2 CPU ranks; the
faults come from tests/hang_model.py through `model.target`. The unit tests at the top
(lock, hang rule, error classification) start no worker.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import UserError
from launcher.rundir.layout import RankError, RunDir, cause, is_secondary
from launcher.rundir.lock import Holder, RunLock, holder_if_held
from launcher.rundir.watchdog import Beat, HangRule, innermost_frame
from tests.runs import FAST, FAST_USER_MODEL, explain, mplaunch, records, start, wait_for_step, write_recipe

# --------------------------------------------------------------------------- unit: the lock


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    lock = tmp_path / "run" / ".lock"
    first = RunLock.acquire(lock, Holder("node7", 4242, time.time(), "917"))
    with pytest.raises(UserError, match=r"is in use by another run: Slurm job 917 \(pid 4242 on node7"):
        RunLock.acquire(lock)
    assert holder_if_held(lock) == Holder.parse(lock.read_text())
    first.release()
    assert holder_if_held(lock) is None
    assert lock.read_text() == ""  # a clean release leaves nobody named
    with RunLock.acquire(lock):
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / ".lock"
    dead = _dead_pid()
    lock.write_text(Holder(platform.node(), dead, 1.0e9).to_json())
    with RunLock.acquire(lock):
        assert Holder.parse(lock.read_text()).pid == os.getpid()  # type: ignore[union-attr]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taking over the stale lock" in err and f"pid {dead} on" in err


def test_a_queued_job_counts_as_a_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "squeue").write_text("#!/bin/bash\necho PENDING\n")
    (stubs / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    lock = tmp_path / ".lock"
    lock.write_text(Holder("login1", None, time.time(), "55", "submitted").to_json())
    with pytest.raises(UserError, match="Slurm job 55"):
        RunLock.acquire(lock)
    assert holder_if_held(lock).job_id == "55"  # type: ignore[union-attr]


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


# --------------------------------------------------------------------------- unit: hangs and causes


def _beat(rank: int, step: int, at: float, phase: str = "step") -> Beat:
    return Beat(rank, step, at, 100 + rank, phase)


def test_hang_rule_fixed_timeout_setup_allowance_and_exit() -> None:
    rule = HangRule(10.0, 2, started=0.0)
    assert rule.check({0: _beat(0, 4, 100.0), 1: _beat(1, 4, 100.0)}, now=109.0) is None
    hang = rule.check({0: _beat(0, 4, 100.0), 1: _beat(1, 3, 95.0)}, now=111.0)
    assert hang is not None and [b.rank for b in hang.stuck] == [0, 1]
    assert hang.describe({1: "m.py:3 in forward"}) == (
        "rank 0 in step 5 for 11s, rank 1 in step 4 for 16s (at m.py:3 in forward)"
    )
    # A rank still in setup (DeepSpeed's op compile) is not hung after 10 s.
    assert rule.check({0: _beat(0, 0, 100.0, "train"), 1: _beat(1, 0, 0.0, "setup")}, now=200.0) is None
    assert rule.check({0: _beat(0, 6, 100.0, "exit"), 1: _beat(1, 6, 100.0)}, now=105.0) is None


def test_auto_hang_timeout_grows_with_the_slowest_step_after_warmup() -> None:
    rule = HangRule("auto", 1, started=0.0)
    assert rule.limit_s == 600
    t = 0.0
    for step in range(1, 10):
        t += 1000.0 if step == 1 else 40.0  # the first step (compile, allocation) is not counted
        rule.observe({0: _beat(0, step, t)})
    assert rule.limit_s == 20 * 40.0
    assert rule.check({0: _beat(0, 9, t)}, now=t + 700) is None
    assert rule.check({0: _beat(0, 9, t)}, now=t + 801) is not None


def test_innermost_frame_of_the_main_thread() -> None:
    dump = (
        "Thread 0x01 (most recent call first):\n"
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait\n'
        "\n"
        "Current thread 0x02 (most recent call first):\n"
        '  File "/x/tests/hang_model.py", line 32 in forward\n'
        '  File "/x/launcher/worker/train.py", line 247 in fit\n'
        '  File "/x/launcher/worker/train.py", line 349 in <module>\n'
        '  File "<frozen runpy>", line 88 in _run_code\n'
    )
    assert innermost_frame(dump) == "hang_model.py:32 in forward"
    assert innermost_frame("") is None


@pytest.mark.parametrize(
    ("message", "secondary"),
    [
        (
            "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
            True,
        ),
        ("DistBackendError: NCCL communicator was aborted on rank 1", True),
        (
            "RuntimeError: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)",
            True,
        ),
        ("RuntimeError: Connection reset by peer", True),
        ("interrupted", True),
        ("no space left on device: /ckpt/step-4 (0 bytes free); free space there", False),
        ("model.target: cannot import 'no_such_module'", False),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ],
)
def test_secondary_errors_are_told_from_causes(message: str, secondary: bool) -> None:
    assert is_secondary(message) == secondary


def test_the_cause_wins_over_an_earlier_consequence(tmp_path: Path) -> None:
    def err(rank: int, message: str) -> RankError:
        return RankError(rank, message, tmp_path / f"rank-{rank}.err")

    peer = err(1, "RuntimeError: Connection closed by peer [::1]:5000")
    own = err(0, "RuntimeError: disk quota exceeded on /scratch")
    assert cause([peer, own]) == own
    assert cause([peer]) == peer
    assert cause([]) is None


def test_a_rank_error_on_a_full_disk_is_not_raised(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "logs").write_text("a file where the logs directory should be")
    assert run.write_rank_error(0, "boom", "Traceback") is None
    assert run.append_event(3, "error", "boom") is True
    assert run.last_step() == 3


# --------------------------------------------------------------------------- runs


def _faulty(
    tmp_path: Path, name: str, fault: str, rank: int, step: int, *layers: dict[str, Any], seconds: float = 0.1
) -> Path:
    return write_recipe(
        tmp_path,
        name,
        FAST_USER_MODEL,
        {
            "model": {
                "name": None,
                "target": "hang_model:build",
                "kwargs": {
                    "vocab_size": 512,
                    "rank": rank,
                    "step": step,
                    "accum": 2,
                    "fault": fault,
                    "seconds": seconds,
                },
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        },
        *layers,
    )


def _report(run_dir: Path) -> str:
    result = mplaunch("report", str(run_dir), "--out", str(run_dir.parent / f"{run_dir.name}-plots"))
    assert result.returncode == 0, explain(result)
    return result.stdout


@pytest.mark.slow
def test_the_same_recipe_started_twice_runs_once(tmp_path: Path) -> None:
    # 2 x 0.25 s a step: the first run trains on for 20 s after step 1, far longer than the
    # second start takes to be refused, however loaded the machine.
    recipe = _faulty(tmp_path, "twice", "sleep", 0, 1, {"train": {"max_steps": 40}}, seconds=0.25)
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
    dead = _dead_pid()
    (run_dir / ".lock").write_text(Holder(platform.node(), dead, time.time() - 60).to_json())
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    taken = [line for line in result.stderr.splitlines() if "stale lock" in line]
    assert len(taken) == 1 and f"pid {dead} on {platform.node()}" in taken[0], result.stderr


@pytest.mark.slow
def test_a_hung_rank_is_named_with_its_stack_and_stopped(tmp_path: Path) -> None:
    recipe = _faulty(tmp_path, "hang", "hang", 1, 3, {"launch": {"hang_timeout": 10}})
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
    recipe = _faulty(tmp_path, "stuck", "hang", 1, 3, {"launch": {"hang_timeout": 600, "stop_grace": 5}})
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
    recipe = _faulty(tmp_path, "cause", "leave", 0, 3)
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
    recipe = _faulty(tmp_path, "enospc", "enospc", 1, 3)
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    assert "the run failed on rank-1: no space left on device: /data/shard-7.bin (" in result.stderr
    assert "bytes free)" in result.stderr


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A 12 MiB tmpfs: room for one checkpoint of the tiny model (8.6 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


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
    assert sorted(p.name for p in (tiny_disk / "ckpt").glob("step-????????")) == ["step-00000002"]
    manifest = json.loads((tiny_disk / "ckpt" / "step-00000002" / "manifest.json").read_text())
    assert manifest["step"] == 2
    errors = [e for e in records(run_dir, "event") if e["event"] == "error"]
    assert len(errors) == 1 and "no space left on device" in errors[0]["message"]
