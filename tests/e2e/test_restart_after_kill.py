"""Nothing lost after `kill -9` of the launcher: a restart right away waits for the old workers.

torchrun runs in its own session and holds the run directory's lock while it stops its workers
after the launcher died (launcher.run.launch), a few seconds. A restart in that time finds the
lock held although the launcher it names is gone: it says whom it waits for, waits, and resumes
from the latest checkpoint. The old torchrun and workers are frozen (SIGSTOP) before the kill and
thawed once the restart says it waits, so the restart meets them still there however slow the
machine: the race is made certain, not shortened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from launcher.run.launch import child_pids
from tests.runs import faulty_recipe, losses, records, start, wait_for_step

WAITING = "is gone; waiting up to"


class _Lines:
    """A running process's output, line by line, with the time each line came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((proc.stdout, self.out), (proc.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: object, into: list[tuple[float, str]]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float) -> str:
        """The first stderr line holding `text`, once it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for _, line in self.err if text in line]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        for reader in self.readers:
            reader.join(timeout=5)
        raise AssertionError(f"no {text!r} line (exit {self.proc.poll()}): {self.text()}")

    def text(self) -> str:
        return "".join(line for _, line in self.out) + "--- stderr\n" + "".join(line for _, line in self.err)


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_restart_right_after_kill_9_waits_for_the_old_workers_and_resumes(tmp_path: Path) -> None:
    # About 1 s a step (0.5 s for each of rank 0's two micro-batches): the first run is still
    # training when it is frozen after its step-2 checkpoint.
    recipe = faulty_recipe(
        tmp_path,
        "killed",
        "sleep",
        0,
        1,
        {"train": {"max_steps": 16}, "checkpoint": {"every_steps": 2}},
        seconds=0.5,
    )
    run_dir = tmp_path / "runs" / "killed"
    first = start(str(recipe))
    old: list[int] = []
    second: subprocess.Popen | None = None
    try:
        wait_for_step(run_dir, 3, first)  # the step-2 checkpoint is sealed before step 3 is recorded
        torchrun = child_pids(first.pid)
        assert len(torchrun) == 1, torchrun
        workers = child_pids(torchrun[0])
        assert len(workers) == 2, workers
        old = [*torchrun, *workers]
        _signal_all(old, signal.SIGSTOP)
        os.killpg(first.pid, signal.SIGKILL)  # the launcher's process group: the launcher alone
        first.wait(timeout=60)
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        assert saved, "no checkpoint before the kill"

        second = start(str(recipe))
        lines = _Lines(second)
        waiting = lines.wait_for(WAITING, timeout=300)
        assert not any(_exited(pid) for pid in old), "an old process exited while frozen"
        assert lines.out == [], "the restart went on before the old workers exited"
        assert f"(pid {first.pid}) is gone; waiting up to 60 s for its workers to exit:" in waiting
        assert f"torchrun pid {torchrun[0]}, worker pids {', '.join(map(str, sorted(workers)))}" in waiting

        thawed = time.monotonic()
        _signal_all(old, signal.SIGCONT)  # torchrun now acts on its SIGTERM and stops the workers
        assert second.wait(timeout=600) == 0, lines.text()
        for reader in lines.readers:
            reader.join(timeout=10)
    finally:
        _signal_all(old, signal.SIGCONT)
        _signal_all(old, signal.SIGKILL)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert all(_exited(pid) for pid in old)
    assert min(at for at, _ in lines.out) > thawed, "the restart went on before the old workers exited"
    out = lines.text()
    assert sum(WAITING in line for _, line in lines.err) == 1, out
    assert "taking over the stale lock" not in out, out
    resumed = [line for _, line in lines.out if line.startswith("mplaunch: resuming from step ")]
    assert len(resumed) == 1, out
    assert int(resumed[0].split()[4]) >= int(saved[-1].removeprefix("step-")), out
    assert "finished 16 steps" in out, out
    assert set(losses(run_dir)) == set(range(1, 17))
    assert records(run_dir, "event")[-1]["event"] == "finish"
