"""The run guard's pieces, without a run: the run lock, the hang rule, and which rank error is the cause."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.rundir.layout import RankError, RunDir, cause, is_secondary
from launcher.rundir.lock import Holder, RunLock, holder_if_held
from launcher.rundir.watchdog import Beat, HangRule, innermost_frame
from tests.runs import dead_pid


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
    dead = dead_pid()
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
