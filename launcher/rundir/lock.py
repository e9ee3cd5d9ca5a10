"""One run per directory: an advisory lock on RUN_DIR/.lock, held for the run's life.

The launcher (a local run) or a Slurm job's batch script (`flock` in slurm/sbatch.sh.j2)
holds an exclusive `flock` on the lock file and writes who holds it into the file
(host, pid, start time, Slurm job id). The kernel drops the lock when the holder's
process dies, however it dies, so a free lock whose file still names a holder is
stale: that process is gone, and the next start takes it over. A submitted Slurm job
is named in the file ("submitted") before it starts; it counts as a holder while
`squeue` still lists it.

A launcher killed outright leaves torchrun holding the lock (it was handed the locked
descriptor) while it stops the workers. A start that finds the lock held although the file
names a local launcher that is gone waits, up to ORPHANS_WAIT_S, for the processes holding it
(torchrun, found by the lock in /proc/PID/fdinfo) and theirs (the workers) to exit, then takes
the lock over; if they outlive that, it names their pids.

Light side: the standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shlex
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
# How long a start waits for the torchrun and workers that a killed launcher left holding the lock.
# torchrun stops its workers with SIGTERM (they checkpoint at the next step boundary) and SIGKILLs
# them after its shutdown timeout, 30 s by default (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): twice that
# covers a slow checkpoint, the kill and a loaded machine. Longer means something ignores SIGKILL.
ORPHANS_WAIT_S = 60.0


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
        """This process, and its Slurm job as squeue, scancel and scontrol name it: an element of a job
        array is ARRAY_INDEX (`123_4`), as one element's own SLURM_JOB_ID names the whole array."""
        array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID") or None
        return cls(platform.node(), os.getpid(), time.time(), job)

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

        Says so on stderr when it takes over a stale lock, or when it waits (up to ORPHANS_WAIT_S)
        for the processes a killed local launcher left holding it.

        Raises:
            UserError: another live process or Slurm job holds it (named in the message), the
                processes a dead launcher left holding it did not exit in time (their pids named),
                or the disk is too full to write who holds it (launcher.rundir.space).
        """
        with space.refused_when_full(path):
            return cls._acquire(path, holder or Holder.this_process())

    @classmethod
    def _acquire(cls, path: Path, holder: Holder) -> RunLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited = False
            if not _try_lock(fd, fcntl.LOCK_EX, RETRY_S):
                waited = _outwait(fd, path, _read(fd))
            previous = _read(fd)
            if previous is not None and previous.queued() and previous.job_id != holder.job_id:
                raise UserError(_held_message(path, previous))
            if previous is not None and previous.state == "running" and not waited:
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


def _outwait(fd: int, path: Path, recorded: Holder | None) -> bool:
    """Wait for the processes a dead launcher of this host left holding the lock `fd` (torchrun,
    stopping its workers) and for those workers, then take the lock; returns True once it is held.

    Raises:
        UserError: the holder the file names is alive, on another host or a Slurm job (today's
            message); or the processes holding the lock are still there after ORPHANS_WAIT_S.
    """
    if recorded is None or recorded.job_id is not None or recorded.pid is None:
        raise UserError(_held_message(path, recorded))
    if recorded.host != platform.node() or not _gone(recorded.pid, recorded.start_s):
        raise UserError(_held_message(path, recorded))
    table = _process_table()
    holders = _lock_holders(fd, table)
    if not holders:  # it exited since the first try, or it is not ours to see
        if _try_lock(fd, fcntl.LOCK_EX, RETRY_S):
            return True
        raise UserError(
            f"{path.parent} is locked by a process this user cannot see, although the launcher that "
            f"held it (pid {recorded.pid}) is gone; nothing was changed",
            hint=f"find it with: fuser -v {shlex.quote(str(path))}",
        )
    named = {pid: table[pid] for pid in [*holders, *_descendants(holders, table)]}
    who = _describe(holders, [p for p in named if p not in holders])
    print(
        f"mplaunch: the launcher that held {path.parent} (pid {recorded.pid}) is gone; waiting up to "
        f"{ORPHANS_WAIT_S:.0f} s for its workers to exit: {who}",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + ORPHANS_WAIT_S
    locked = False
    while True:
        locked = locked or _try_lock(fd, fcntl.LOCK_EX, 0.0)
        left = [pid for pid, proc in named.items() if _running(pid, proc)]
        if locked and not left:
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not left:  # those named are gone, yet the lock is held: by whoever holds it now
        holders = _lock_holders(fd, _process_table()) or holders
        left = holders
    still = _describe([p for p in holders if p in left], [p for p in left if p not in holders])
    raise UserError(
        f"{path.parent} is still in use by what its dead launcher (pid {recorded.pid}) started: "
        f"{still} did not exit within {ORPHANS_WAIT_S:.0f} s; nothing was changed",
        hint=f"stop them (kill {' '.join(map(str, left))}; kill -9 if they ignore it), then start again",
    )


@dataclass(frozen=True)
class _Proc:
    """A process's /proc/PID/stat: its parent, state (Z: a zombie) and start (clock ticks after boot)."""

    ppid: int
    state: str
    start_ticks: int

    @classmethod
    def read(cls, pid: int) -> _Proc | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except OSError:
            return None
        fields = text.rpartition(") ")[2].split()  # after the name, which may hold ") "
        try:
            return cls(int(fields[1]), fields[0], int(fields[19]))
        except (IndexError, ValueError):
            return None


def _process_table() -> dict[int, _Proc]:
    """Every process this user can see, by pid (Linux /proc; empty elsewhere)."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            proc = _Proc.read(int(entry)) if entry.isdigit() else None
            if proc is not None:
                table[int(entry)] = proc
    return table


def _lock_holders(fd: int, table: dict[int, _Proc]) -> list[int]:
    """The other processes whose descriptor on `fd`'s file holds its flock (fdinfo's `lock:` line):
    not the ones that merely opened it, as another start or `mplaunch report` does."""
    here = os.fstat(fd)
    holders = []
    for pid in sorted(set(table) - {os.getpid()}):
        with contextlib.suppress(OSError):
            for entry in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{entry}")
                    if (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino):
                        continue
                    if "FLOCK" in Path(f"/proc/{pid}/fdinfo/{entry}").read_text():
                        holders.append(pid)
                        break
    return holders


def _descendants(roots: list[int], table: dict[int, _Proc]) -> list[int]:
    """The processes started by `roots` and by those, in pid order (torchrun's: the workers)."""
    found: set[int] = set()
    todo = list(roots)
    while todo:
        parent = todo.pop()
        kids = [pid for pid, proc in table.items() if proc.ppid == parent and pid not in found]
        found.update(kids)
        todo += kids
    return sorted(found - set(roots))


def _describe(holders: list[int], others: list[int]) -> str:
    """ "torchrun pid 12, worker pids 13, 14" """
    parts = [f"{_program(pid)} pid {pid}" for pid in holders]
    if others:
        parts.append(f"worker pid{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}")
    return ", ".join(parts)


def _program(pid: int) -> str:
    """ "torchrun" (`python -m torch.distributed.run` too), else the program's file name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "process"
    if "torch.distributed.run" in argv or any(Path(a).name == "torchrun" for a in argv[:2]):
        return "torchrun"
    return Path(argv[0]).name or "process"


def _running(pid: int, seen: _Proc) -> bool:
    """`pid` is still the process `seen` and has not exited (a zombie has)."""
    now = _Proc.read(pid)
    return now is not None and now.start_ticks == seen.start_ticks and now.state != "Z"


def _gone(pid: int, start_s: float) -> bool:
    """The process `pid`, which recorded itself at `start_s`, has exited: no such process, a
    zombie, or a process that started later (the pid was reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    proc = _Proc.read(pid)
    if proc is None:
        return False  # alive, and no /proc to tell more
    return proc.state == "Z" or (start_s > 0 and _started_s(proc) > start_s + 2.0)


def _started_s(proc: _Proc) -> float:
    """When `proc` started (Unix s): the boot time in /proc/stat plus its start in clock ticks."""
    try:
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return 0.0
    return boot + proc.start_ticks / os.sysconf("SC_CLK_TCK")
