"""The hang watch's hands (stack dumps, stopping the workers), and each Slurm node's watcher.

A local launch watches its workers from a thread (launcher.run.launch.Workers). Inside a Slurm
job no launcher runs, so the sbatch script's task on every node starts `python -m
launcher.run.hangwatch PLAN PID` in the background, then execs torchrun in the shell PID: the
watcher and the node's workers are torchrun's children. Every watcher applies the local rule
(launch.hang_timeout: launcher.rundir.watchdog) to the ranks' heartbeats in the shared run
directory, and the nodes agree through one file, RUN_DIR/slurm/hang.json:

1. The first watcher to find a hang that holds one of its own ranks writes the decision (a
   hard link: exactly one wins, the others take it). Its own ranks' heartbeats are this node's
   writes, so a heartbeat that another node's file system shows late is never all it saw.
2. Every watcher sends SIGUSR2 to its node's stuck ranks and flushes their stack files
   (RUN_DIR/logs/rank-N.stack) to the shared file system.
3. The deciding watcher waits for every stuck rank's stacks, prints the verdict (the local
   launcher's line) to the job's error log and writes it into the decision.
4. Every watcher stops its node's torchrun and workers (without a verdict after VERDICT_WAIT_S,
   the deciding node being gone, it stops them anyway).

After srun, launcher.run.requeue finds this attempt's decision, records its verdict as the
run's "error" event (what `mplaunch report` shows, as for a local hang) and does not requeue
the job, which would hang again. A watcher lives as long as torchrun: it ignores the signals
Slurm sends the job steps (the stop signal, SIGTERM) and leaves once torchrun has gone.

Light side: no torch import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.plan.resolve import Plan
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.rundir.watchdog import Beat, Hang, HangRule, hang_verdict, innermost_frame

POLL_S = 1.0  # how often a node's watcher reads the heartbeats and the decision
STACK_WAIT_S = 5.0  # for the ranks' stack dumps to appear
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL when the watch stops the workers
# How long a node waits for the deciding node's verdict before it stops its workers anyway.
VERDICT_WAIT_S = STACK_WAIT_S + 10 * POLL_S
# Slurm signals every process of a job step: the stop signal (SIGUSR1), SIGTERM when it cancels,
# requeues or times out the job. torchrun handles them; its watcher outlives them.
IGNORED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
DECISION_FILE = "hang.json"


def child_pids(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's are the workers); Linux /proc, empty elsewhere."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def worker_ranks(torchrun: int) -> dict[int, int]:
    """Rank -> pid of torchrun's workers: its children with RANK in their environment (a pid
    alone could be another node's rank: each node numbers its own processes)."""
    ranks = {}
    for pid in child_pids(torchrun):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((item[5:] for item in environ if item.startswith(b"RANK=")), b"")
        if rank.isdigit() and pid != os.getpid():
            ranks[int(rank)] = pid
    return ranks


def signal_stacks(pids: Mapping[int, int], workers: Collection[int]) -> list[int]:
    """SIGUSR2 to each rank's pid (the worker's faulthandler writes its stacks); the ranks
    signalled. A pid that is not one of `workers` (any more) is not signalled."""
    sent = []
    for rank, pid in sorted(pids.items()):
        if pid not in workers:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
            sent.append(rank)
    return sent


def wait_for_stacks(files: RunDir, ranks: Sequence[int], wait_s: float) -> list[int]:
    """Wait up to `wait_s` for the ranks' stack dumps; the ranks whose dump was written."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(_size(files.stack_dump(r)) for r in ranks):
        time.sleep(0.1)
    time.sleep(0.2)  # the dump of the other threads may still be going out
    return [r for r in ranks if _size(files.stack_dump(r))]


def innermost_frames(files: RunDir, ranks: Sequence[int]) -> dict[int, str]:
    """Each rank's innermost frame ("hang_model.py:31 in forward"), from its stack dump."""
    frames = {}
    for rank in ranks:
        try:
            frame = innermost_frame(files.stack_dump(rank).read_text(errors="replace"))
        except OSError:
            continue
        if frame:
            frames[rank] = frame
    return frames


def stop_workers(torchrun: int, gone: Callable[[float], bool], spare: Collection[int] = ()) -> None:
    """SIGTERM to torchrun's children and torchrun, SIGKILL to whatever is left after KILL_GRACE_S.

    Args:
        torchrun: its pid.
        gone: whether torchrun has ended within the seconds given.
        spare: children left alone (a node's watcher is one).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone(0.0):
            return
        for pid in [*child_pids(torchrun), torchrun]:
            if pid not in spare:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        if gone(KILL_GRACE_S):
            return


def _size(path: Path) -> int:
    """Bytes in `path`, 0 when absent; through open(), on which a shared file system shows what
    another node wrote (close-to-open)."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size
    except OSError:
        return 0


def _flush(path: Path) -> None:
    """Write a file's cached pages to its file system (NFS writes another process's back lazily)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- a Slurm job


def decision_file(files: RunDir) -> Path:
    return files.slurm_dir / DECISION_FILE


@dataclass(frozen=True)
class Decision:
    """A Slurm job's hang, as the watcher that found it wrote it (RUN_DIR/slurm/hang.json)."""

    hang: Hang
    limit: str  # the finding watcher's HangRule.describe_limit()
    by: str  # "n1, pid 4242": the watcher that found it
    verdict: str  # the one line, with the stuck ranks' frames and stack files once `final`
    final: bool = False

    def to_json(self) -> str:
        fields = {"hang": self.hang.to_dict(), "limit": self.limit, "by": self.by}
        return json.dumps({**fields, "verdict": self.verdict, "final": self.final}) + "\n"

    @classmethod
    def read(cls, path: Path, since: float) -> Decision | None:
        """The decision in `path` when it was taken at or after `since` (Unix s), else None: an
        earlier attempt's decision is not this one's."""
        try:
            raw = json.loads(path.read_text())
            hang = Hang.from_dict(raw["hang"])
            limit, by, verdict, final = str(raw["limit"]), str(raw["by"]), str(raw["verdict"]), raw["final"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if hang is None or hang.now < since:
            return None
        return cls(hang, limit, by, verdict, final is True)


def hang_since(run_dir: Path, since: float) -> Decision | None:
    """The hang the nodes' watchers stopped a Slurm job's workers for, at or after `since` (Unix s)."""
    return Decision.read(decision_file(RunDir.of(run_dir)), since)


def started_at(pid: int) -> float | None:
    """When process `pid` started (Unix s, to a clock tick), or None when /proc cannot say."""
    try:
        # Field 22 of /proc/PID/stat, counted after the command's closing parenthesis.
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _claim(path: Path, decision: Decision) -> bool:
    """Write `decision` unless another watcher's is there; True when this one stands."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(decision.to_json())
        os.link(tmp, path)  # fails when the file exists, atomically, also on NFS
    except FileExistsError:
        theirs = Decision.read(path, 0.0)  # NFS may answer a retried link that succeeded so
        return theirs is not None and theirs.by == decision.by
    except OSError:
        return True  # not written (a full disk): the other nodes find the hang for themselves
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return True


class NodeWatch:
    """One Slurm node's watcher of the torchrun in process `torchrun`, its parent."""

    def __init__(self, plan: Plan, torchrun: int) -> None:
        self.files = RunDir.from_plan(plan)
        self.torchrun = torchrun
        # Heartbeats and decisions from before torchrun's shell started are an earlier attempt's (the
        # watcher's own start may come after the first steps of workers quicker to import than it).
        self.started = started_at(torchrun) or time.time()
        self.rule = HangRule(plan.recipe.launch.hang_timeout, plan.world_size, self.started)
        self.path = decision_file(self.files)
        self.me = f"{os.environ.get('SLURMD_NODENAME') or socket.gethostname()}, pid {os.getpid()}"
        if Decision.read(self.path, self.started) is None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # an earlier attempt's, which would keep this one's out

    def gone(self, timeout_s: float = 0.0) -> bool:
        """Whether torchrun has ended (within `timeout_s`): its child, this watcher, has another parent."""
        deadline = time.monotonic() + timeout_s
        while os.getppid() == self.torchrun:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def run(self) -> None:
        """Watch until torchrun ends, or until a hang was found and this node's workers stopped."""
        while not self.gone(POLL_S):
            decision = Decision.read(self.path, self.started) or self._decide()
            if decision is not None:
                self._act(decision)
                return

    def _decide(self) -> Decision | None:
        """The decision that stands when the rule finds a hang holding one of this node's ranks:
        this watcher's, or another node's that came first."""
        parsed = (Beat.parse(raw) for raw in self.files.heartbeats().values())
        beats = {b.rank: b for b in parsed if b is not None and b.time >= self.started}
        hang = self.rule.check(beats, time.time())
        if hang is None or not {b.rank for b in hang.stuck} & set(worker_ranks(self.torchrun)):
            return None
        limit = self.rule.describe_limit()
        mine = Decision(hang, limit, self.me, hang_verdict(hang, limit, {}, []))
        return mine if _claim(self.path, mine) else Decision.read(self.path, self.started)

    def _act(self, decision: Decision) -> None:
        """Dump this node's stuck ranks' stacks; the decider says the verdict; stop this node's workers."""
        workers = worker_ranks(self.torchrun)
        stuck = [b.rank for b in decision.hang.stuck]
        sent = signal_stacks({r: workers[r] for r in stuck if r in workers}, workers.values())
        for rank in wait_for_stacks(self.files, sent, STACK_WAIT_S):
            _flush(self.files.stack_dump(rank))  # for the deciding node to read
        if decision.by == self.me:
            written = wait_for_stacks(self.files, stuck, STACK_WAIT_S + 2 * POLL_S)
            stacks = [self.files.stack_dump(r) for r in written]
            verdict = hang_verdict(
                decision.hang, decision.limit, innermost_frames(self.files, written), stacks
            )
            print(f"mplaunch: {verdict}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):  # a full disk: requeue records the first verdict
                final = dataclasses.replace(decision, verdict=verdict, final=True)
                checkpoint.write_atomic(self.path, final.to_json())
        else:
            self._await_verdict()
        stop_workers(self.torchrun, self.gone, spare={os.getpid()})

    def _await_verdict(self) -> None:
        """Until the decider has said the verdict (its stacks are then read), at most VERDICT_WAIT_S."""
        deadline = time.monotonic() + VERDICT_WAIT_S
        while time.monotonic() < deadline and not self.gone(0.2):
            decision = Decision.read(self.path, self.started)
            if decision is None or decision.final:
                return


def main(argv: Sequence[str]) -> int:
    """`python -m launcher.run.hangwatch PLAN TORCHRUN_PID`: each Slurm node's task starts it
    in the background before it execs torchrun in the shell TORCHRUN_PID."""
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    plan_path, torchrun = argv
    try:
        plan = Plan.from_json(Path(plan_path).read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:  # another version's plan, say
        print(f"mplaunch: cannot read {plan_path} ({exc}); the ranks on this node are not watched for a hang",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    NodeWatch(plan, int(torchrun)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
