"""The run guard's pieces, without a run: the run lock, the hang rule, and which rank error is the cause."""

from __future__ import annotations

import fcntl
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.run import start
from launcher.rundir import lock as lock_mod
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


# A process that the dead launcher started, given its locked descriptor (as torchrun is): it starts a
# worker of its own (which does not inherit the descriptor), prints the worker's pid, and both sleep.
_LEFT_BEHIND = (
    "import subprocess, sys, time\n"
    "sleep = 'import sys, time; time.sleep(float(sys.argv[1]))'\n"
    "worker = subprocess.Popen([sys.executable, '-c', sleep, sys.argv[2]])\n"
    "print(worker.pid, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


def _left_behind(
    lock: Path, recorded: Holder, holder_s: float, worker_s: float
) -> tuple[subprocess.Popen, int]:
    """The lock `lock` held by a child (living `holder_s`) and its worker (`worker_s`), naming `recorded`,
    as a launcher killed by SIGKILL leaves it; returns the child and its worker's pid."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, recorded.to_json().encode(), 0)
        child = subprocess.Popen(
            [sys.executable, "-c", _LEFT_BEHIND, str(holder_s), str(worker_s)],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(fd)  # the child is left holding the lock, as torchrun is
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("reused", [False, True], ids=["dead pid", "pid reused since"])
def test_a_start_waits_for_what_a_killed_launcher_left_holding_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, reused: bool
) -> None:
    monkeypatch.setattr(lock_mod, "RETRY_S", 0.0)  # the child must still hold the lock when it is looked at
    lock = tmp_path / "run" / ".lock"
    # A reused pid: this process, alive, but started long after the holder recorded itself.
    recorded = (
        Holder(platform.node(), os.getpid(), 1.0e9)
        if reused
        else Holder(platform.node(), dead_pid(), time.time())
    )
    child, worker = _left_behind(lock, recorded, holder_s=2.0, worker_s=3.0)
    try:
        with RunLock.acquire(lock):
            assert child.poll() is not None  # both gone before the lock was taken
            assert _exited(worker)
            assert Holder.parse(lock.read_text()).pid == os.getpid()  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err
    assert err == (
        f"mplaunch: the launcher that held {lock.parent} (pid {recorded.pid}) is gone; waiting up to 60 s "
        f"for its workers to exit: {Path(sys.executable).name} pid {child.pid}, worker pid {worker}\n"
    )


def test_what_outlives_the_wait_is_named_and_nothing_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_mod, "ORPHANS_WAIT_S", 1.0)
    lock = tmp_path / "run" / ".lock"
    recorded = Holder(platform.node(), dead_pid(), time.time())
    child, worker = _left_behind(lock, recorded, holder_s=60.0, worker_s=60.0)
    try:
        started = time.monotonic()
        with pytest.raises(UserError) as refused:
            RunLock.acquire(lock)
        assert time.monotonic() - started < 30  # bounded by ORPHANS_WAIT_S, not by the child
        assert child.poll() is None
        assert Holder.parse(lock.read_text()) == recorded  # nothing written
    finally:
        child.kill()
        child.wait()
        os.kill(worker, 9)
    assert refused.value.lines == [
        f"{lock.parent} is still in use by what its dead launcher (pid {recorded.pid}) started: "
        f"{Path(sys.executable).name} pid {child.pid}, worker pid {worker} did not exit within 1 s; "
        f"nothing was changed (hint: stop them (kill {child.pid} {worker}; kill -9 if they ignore it), "
        "then start again)"
    ]
    assert "waiting up to 1 s" in capsys.readouterr().err


def test_a_holder_this_user_cannot_see_is_said_with_how_to_find_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_mod, "RETRY_S", 0.0)
    monkeypatch.setattr(lock_mod, "_lock_holders", lambda fd, table: [])  # another user's, say
    lock = tmp_path / "run" / ".lock"
    recorded = Holder(platform.node(), dead_pid(), time.time())
    child, _ = _left_behind(lock, recorded, holder_s=60.0, worker_s=0.0)
    try:
        with pytest.raises(UserError) as refused:
            RunLock.acquire(lock)
    finally:
        child.kill()
        child.wait()
    assert refused.value.lines == [
        f"{lock.parent} is locked by a process this user cannot see, although the launcher that held it "
        f"(pid {recorded.pid}) is gone; nothing was changed (hint: find it with: fuser -v {lock})"
    ]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("host", "job_id"), [("node7", None), (platform.node(), "917")], ids=["another host", "a Slurm job"]
)
def test_a_dead_holder_elsewhere_or_in_a_slurm_job_is_named_at_once(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    job_id: str | None,
) -> None:
    monkeypatch.setattr(lock_mod, "RETRY_S", 0.0)
    lock = tmp_path / "run" / ".lock"
    recorded = Holder(host, dead_pid(), time.time(), job_id)
    child, worker = _left_behind(lock, recorded, holder_s=60.0, worker_s=0.0)
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=f"is in use by another run: .*pid {recorded.pid} on {host}"):
            RunLock.acquire(lock)
        assert time.monotonic() - started < 30
    finally:
        child.kill()
        child.wait()
    assert capsys.readouterr().err == ""


def test_a_live_local_holder_is_named_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "run" / ".lock"
    mine = f"is in use by another run: pid {os.getpid()} on {platform.node()}"
    with RunLock.acquire(lock), pytest.raises(UserError, match=mine):
        RunLock.acquire(lock)
    assert capsys.readouterr().err == ""


def test_the_resubmit_hint_quotes_the_script_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "my runs" / "bert's"
    with pytest.raises(UserError) as refused:
        start.resume_target(str(run_dir), slurm_job=True)
    script = RunDir.of(run_dir).slurm_script
    assert refused.value.lines[0].endswith(f"(hint: resubmit it: sbatch {shlex.quote(str(script))})")
    assert shlex.split(refused.value.lines[0].rpartition("sbatch ")[2][:-1]) == [str(script)]


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
