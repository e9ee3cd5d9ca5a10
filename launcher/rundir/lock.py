"""One run per directory: an advisory lock on RUN_DIR/.lock, held for the run's life.

The launcher (a local run) or a Slurm job's batch script (`flock` in slurm/sbatch.sh.j2)
holds an exclusive `flock` on the lock file and writes who holds it into the file
(host, pid, start time, Slurm job id). The kernel drops the lock when the holder's
process dies, however it dies, so a free lock whose file still names a holder is
stale: that process is gone, and the next start takes it over. A submitted Slurm job
is named in the file ("submitted") before it starts; it counts as a holder while
`squeue` still lists it.

Light side: the standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from launcher.errors import UserError
from launcher.rundir import space

# A reader (`mplaunch report`) takes the lock for a moment to see whether it is held;
# a start that finds it taken tries again for this long before calling it held.
RETRY_S = 1.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory's lock, as its lock file records it."""

    host: str
    pid: int | None
    start_s: float
    job_id: str | None = None
    state: str = "running"  # "running", or "submitted" for a Slurm job not yet started

    @classmethod
    def this_process(cls) -> Holder:
        return cls(platform.node(), os.getpid(), time.time(), os.environ.get("SLURM_JOB_ID") or None)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file records, or None (an empty or unreadable file)."""
        try:
            data = json.loads(text)
            pid = data.get("pid")
            job = data.get("job_id")
            return cls(
                str(data.get("host") or "?"),
                int(pid) if pid not in (None, "") else None,
                float(data.get("start_s") or 0),
                str(job) if job not in (None, "") else None,
                str(data.get("state") or "running"),
            )
        except (ValueError, TypeError, AttributeError):
            return None

    def queued(self) -> bool:
        """A submitted Slurm job that has not started (and taken the lock) yet, but is still queued.

        A started job holds the flock itself: once that is free, the job is gone.
        """
        return self.state == "submitted" and self.job_id is not None and job_alive(self.job_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        """ "Slurm job 123 (pid 456 on node1, since 2026-12-02 15:40:01)", for one-line messages."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_s)) if self.start_s else "?"
        where = f"pid {self.pid} on {self.host}" if self.pid is not None else f"submitted from {self.host}"
        who = (
            f"Slurm job {self.job_id} ({where}, since {since})" if self.job_id else f"{where} (since {since})"
        )
        return who if self.state == "running" else f"{who}, {self.state}"


class RunLock:
    """The held lock of one run directory; `release` (or leaving the `with`) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, holder: Holder | None = None) -> RunLock:
        """Take the lock file `path` (creating it and its directory) for `holder` (this process).

        Says so on stderr when it takes over a stale lock.

        Raises:
            UserError: another live process or Slurm job holds it (named in the message), or the
                disk is too full to write who holds it (launcher.rundir.space).
        """
        with space.refused_when_full(path):
            return cls._acquire(path, holder or Holder.this_process())

    @classmethod
    def _acquire(cls, path: Path, holder: Holder) -> RunLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd, fcntl.LOCK_EX, RETRY_S):
                raise UserError(_held_message(path, _read(fd)))
            previous = _read(fd)
            if previous is not None and previous.queued() and previous.job_id != holder.job_id:
                raise UserError(_held_message(path, previous))
            if previous is not None and previous.state == "running":
                print(
                    f"mplaunch: taking over the stale lock {path}: {previous.describe()} is gone",
                    file=sys.stderr,
                )
            _write(fd, holder.to_json())
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def fileno(self) -> int:
        """The locked descriptor: a child given it (Popen pass_fds) holds the lock while it lives."""
        assert self._fd is not None, "the lock was released"
        return self._fd

    def release(self, keep: Holder | None = None) -> None:
        """Give the lock up; the file then names `keep` (a submitted job) or nobody."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a full disk must not turn a finished run into a failure
            _write(self._fd, keep.to_json() if keep else "")
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder_if_held(path: Path) -> Holder | None:
    """Who holds the lock `path` now, or None when nobody does (nor does a queued Slurm job).

    Raises:
        FileNotFoundError: no lock file (a run directory from before locks, or a copy).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        recorded = _read(fd)
        if not _try_lock(fd, fcntl.LOCK_SH, 0.0):
            return recorded or Holder("?", None, 0.0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if recorded is not None and recorded.queued():
        return recorded
    return None


def job_alive(job_id: str) -> bool:
    """True while `squeue` lists the Slurm job (pending, running, requeued); False without squeue."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(
        s not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT") for s in states
    )


def _held_message(path: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder else "another process (it wrote no holder yet)"
    return (
        f"{path.parent} is in use by another run: {who}; nothing was changed "
        f"(wait for it to end, stop it, or use another name; lock {path})"
    )


def _try_lock(fd: int, kind: int, retry_s: float) -> bool:
    deadline = time.monotonic() + retry_s
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _read(fd: int) -> Holder | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return None
    return Holder.parse(text) if text.strip() else None


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
