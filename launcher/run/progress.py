"""What a user watches during a run: the launcher's live bar, or rank 0's plain lines, and the
workers' output as the launcher passes it on.

The launcher draws one live bar when its stderr is an interactive terminal and
logging.progress is true: rank 0's step from its heartbeat (launcher.rundir.watchdog), and the
loss, loss scale, skipped steps, samples/s, MFU and ETA of the newest "train" record of
RUN_DIR/metrics.jsonl. It then sets MPLAUNCH_PROGRESS=launcher in torchrun's environment
(the one place this variable is set; not in plan.env, since whether a terminal is attached
is not part of the plan and a Slurm job never has one), and rank 0's Console prints nothing
per interval: metrics.jsonl still gets every record, and every other line the workers print
reaches the terminal through the launcher, above the bar. Anywhere else (a pipe, CI, a Slurm
log, logging.progress false) rank 0 prints one plain line per interval, `plain_line`.
The launcher leaves torchrun's own lines out (`TorchrunFilter`), and reads from its summary
of failed workers the ranks a signal killed (`WorkerExits`, `killed_by`).

Before the first step the bar says what rank 0 is doing, and for how long so far ("building
DeepSpeed's CPU communication op (first run only, ~1-2 min) | 0:42 elapsed"), from the `detail` of
its heartbeat, which each rank's `Phases` writes as a setup phase begins; with no bar drawn, rank 0
prints one line for a phase still going after LONG_SETUP_S instead.

Light side: the standard library; rich is imported only when a bar is drawn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.progress import Progress

    from launcher.plan.resolve import Plan
    from launcher.rundir.layout import RunDir
    from launcher.rundir.watchdog import Beat

ENV = "MPLAUNCH_PROGRESS"
LAUNCHER = "launcher"  # ENV's value: the launcher draws the bar, rank 0 stays quiet
LONG_SETUP_S = 10.0  # with no bar, rank 0 says which setup phase is still going after this long
# Why a rank may die of a signal, as far as the signal tells; SIGABRT is often a peer's consequence.
_SIGNAL_HINTS: dict[int, str] = {
    signal.SIGKILL: "out of memory?",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a memory-mapped file shrank, or /dev/shm is full?",
    signal.SIGABRT: "aborted in native code, often after another rank failed",
}


def stats_text(record: Mapping[str, Any], fp16: bool) -> str:
    """ "loss 2.3456 | scale 1024 | skipped 3 | 1,234.5 samples/s | MFU 41.2%" for a "train" record;
    skipped steps are shown with fp16 (`fp16`) or once any step was skipped."""
    parts = [f"loss {record['loss']:.4f}"]
    if record.get("loss_scale") is not None:
        parts.append(f"scale {record['loss_scale']:g}")
    if fp16 or record.get("skipped_steps"):
        parts.append(f"skipped {record.get('skipped_steps') or 0}")
    parts.append(f"{record['samples_per_s']:,.1f} samples/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


def eta_s(step: int, total: int, record: Mapping[str, Any]) -> float:
    """Seconds left at `step` of `total`, at the record's seconds per step."""
    return max(0, total - step) * float(record["step_time_s"])


def duration(seconds: float) -> str:
    """ "1:02:03" or "2:03"."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plain_line(record: Mapping[str, Any], total: int, fp16: bool) -> str:
    """Rank 0's line per interval off a terminal: "step 3/10 | loss 2.3456 | ... | eta 0:07"."""
    step = int(record["step"])
    return f"step {step}/{total} | {stats_text(record, fp16)} | eta {duration(eta_s(step, total, record))}"


class MetricsTail:
    """The newest "train" record of a metrics.jsonl, read on from where the last `poll` stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Records already there belong to an earlier attempt (a resume); the bar starts with this one's.
        self.offset = _size(path)
        self.latest: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any] | None:
        """Read the lines appended since the last call; returns the newest "train" record so far."""
        try:
            with open(self.path, "rb") as f:
                if _size(self.path) < self.offset:  # the file was replaced: read the new one whole
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.latest
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") == "train":
                self.latest = record
        return self.latest


class Bar:
    """The launcher's live bar; `update` from the heartbeat poll, `print` for lines shown above it.

    Args:
        total: train.max_steps.
        fp16: show skipped steps even while there are none.
        metrics: RUN_DIR/metrics.jsonl.
        console: where to draw (tests pass one writing to a string).
        heartbeat: rank 0's heartbeat file, whose `detail` says what it does before its first step.
    """

    def __init__(
        self, total: int, fp16: bool, metrics: Path, console: RichConsole, heartbeat: Path | None = None
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.total = total
        self.fp16 = fp16
        self.tail = MetricsTail(metrics)
        self.heartbeat = heartbeat
        self.began = time.time()
        self.step = 0
        self.progress: Progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            console=console,
            refresh_per_second=4,
            # The launcher's own messages (a stop request, a hang) go above the bar too; a stdout
            # that is not the terminal (`> file`) keeps its lines.
            redirect_stdout=sys.stdout.isatty(),
        )
        self.task = self.progress.add_task("starting", total=total, stats="")

    @classmethod
    def for_terminal(cls, plan: Plan) -> Bar | None:
        """The bar for this plan if the launcher's stderr is an interactive terminal and
        logging.progress is true; None otherwise (rank 0 prints plain lines)."""
        if not plan.recipe.logging.progress or not sys.stderr.isatty():
            return None
        from rich.console import Console as RichConsole

        console = RichConsole(stderr=True)
        if not console.is_interactive:  # TERM=dumb: a bar that cannot redraw would only show at the end
            return None
        from launcher.rundir.layout import RunDir

        fp16 = plan.precision.loss_scale is not None
        files = RunDir.from_plan(plan)
        return cls(plan.recipe.train.max_steps, fp16, files.metrics, console, files.heartbeat(0))

    def start(self) -> None:
        self.progress.start()

    def update(self, beats: Mapping[int, Beat]) -> None:
        """Show rank 0's heartbeat step and the newest "train" record, or what rank 0 is doing
        before its first step."""
        record = self.tail.poll()
        beat = beats.get(0)
        if beat is not None:
            self.step = max(self.step, beat.step)
        if record is not None:
            self.step = max(self.step, int(record["step"]))
        phase = "setup" if beat is None or beat.phase == "setup" else "train"
        stats = self.doing(beat is not None) or self.stats(record)
        self.progress.update(self.task, description=phase, completed=self.step, stats=stats)

    def doing(self, started: bool) -> str | None:
        """ "building the model | 0:12 elapsed": what rank 0 is doing, while its heartbeat says
        (`started`: it wrote one); "starting the workers" before; None once it trains."""
        if not started:
            return f"starting the workers | {duration(time.time() - self.began)} elapsed"
        beat = _read_json(self.heartbeat) if self.heartbeat is not None else None
        if not beat or beat.get("phase") not in ("setup", "train") or not beat.get("detail"):
            return None
        since = beat.get("time")
        elapsed = time.time() - since if isinstance(since, int | float) else 0.0
        return f"{beat['detail']} | {duration(elapsed)} elapsed"

    def stats(self, record: Mapping[str, Any] | None) -> str:
        if record is None:
            return ""
        eta = duration(eta_s(self.step, self.total, record))
        return f"{stats_text(record, self.fp16)} | eta {eta}"

    def print(self, line: str) -> None:
        """One line of worker output, above the bar, as it was written (escape codes decoded, no markup)."""
        from rich.text import Text

        self.progress.console.print(Text.from_ansi(line.rstrip("\n")), soft_wrap=True)

    def stop(self) -> None:
        """Leave the final state on the terminal."""
        self.progress.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Phases:
    """How long a rank took from its process's start to its first step, phase by phase, and what
    it is doing meanwhile.

    "start" is the time before the Phases was made: the interpreter, imports (torch, the backend),
    the process group. `begin` says what the rank does next: its heartbeat names it (`detail`),
    which the launcher's bar shows with the time taken so far; on rank 0 with no bar (a pipe, CI,
    a Slurm log) one line follows when it is still going after `after_s`,
    "mplaunch: still building the model after 10 s". `end(name)` times the phase as `name`.

    Args:
        beat: writes this rank's heartbeat (step, phase, detail); None writes none.
        say: print that line (`for_rank`: on rank 0 when the launcher draws no bar).
        after_s: how long a phase goes before the line.
    """

    def __init__(
        self,
        beat: Callable[[int, str, str], None] | None = None,
        say: bool = False,
        after_s: float = LONG_SETUP_S,
    ) -> None:
        now = time.time()
        began = _process_start_time()
        self.began = now if began is None else began
        self.last = now
        self.seconds: dict[str, float] = {"start": round(now - self.began, 3)}
        self.beat = beat
        self.say = say
        self.after_s = after_s
        self.timer: threading.Timer | None = None

    @classmethod
    def for_rank(cls, files: RunDir, rank: int) -> Phases:
        """The phases of `rank`, beating its heartbeat in `files`."""

        def beat(step: int, phase: str, detail: str) -> None:
            files.write_heartbeat(rank, step, phase, detail)

        return cls(beat, say=rank == 0 and os.environ.get(ENV) != LAUNCHER)

    def begin(self, doing: str, phase: str = "setup", step: int = 0) -> None:
        """The rank now does `doing` ("building the model"); its heartbeat says so, in `phase` at `step`."""
        self._quiet()
        if self.beat is not None:
            self.beat(step, phase, doing)
        if self.say:
            line = f"mplaunch: still {doing} after {self.after_s:.0f} s"
            self.timer = threading.Timer(self.after_s, print, (line,), {"flush": True})
            self.timer.daemon = True  # never keeps a failed rank from exiting
            self.timer.start()

    def end(self, name: str, then: str | None = None) -> None:
        """Record the time since the last `end` (or the start) as phase `name`; `then`: what comes
        next, as `begin` says it."""
        now = time.time()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now
        self._quiet()
        if then is not None:
            self.begin(then)

    def describe(self, step: int) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"step {step} done {self.last - self.began:.1f} s after the worker started ({parts})"

    def _quiet(self) -> None:
        """The phase said is over: no line for it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _process_start_time() -> float | None:
    """This process's start (Unix s), from /proc (Linux); None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class TorchrunFilter:
    """Drops torchrun's own log lines and its ChildFailedError traceback (`stderr`: torchrun writes
    them there), and the notes DeepSpeed prints once per rank as it loads its ops; workers' lines pass."""

    _LOG = re.compile(r"^\s*(\[?[WEI]\d{4} |\[rank\d+\]:|torch\.distributed\.elastic|W\d{4}|E\d{4}|I\d{4})")
    _BANNER = re.compile(r"^(=+|-+)$")
    # Successes the user cannot act on; a failed build still shows its compiler errors.
    _OP_BUILD = re.compile(
        r"^(DeepSpeed \S+ built successfully|Using \S+ as PyTorch extensions root\.*"
        r"|Loading extension module \S+\.*|Time to load \S+ op: [\d.]+ seconds"
        r"|Emitting ninja build file \S+\.*|Building extension module \S+\.*"
        r"|Allowing ninja to set a default number of workers.*|ninja: no work to do\.)$"
    )

    def __init__(self, stderr: bool = True) -> None:
        self.stderr = stderr
        self.in_traceback = False

    def keep(self, line: str) -> bool:
        stripped = line.rstrip("\n")
        if not self.stderr:  # a traceback a user's code prints to stdout must not silence the rest
            return not self._OP_BUILD.match(stripped)
        if stripped.startswith("Traceback (most recent call last):"):
            # Workers never print tracebacks (they write them to RUN_DIR/logs); this one is torchrun's.
            self.in_traceback = True
        if self.in_traceback:
            return False
        return not (
            self._LOG.match(stripped)
            or self._BANNER.match(stripped.strip())
            or self._OP_BUILD.match(stripped)
        )


class WorkerExits:
    """The exit codes torchrun gives for the workers that failed, from the summary it prints on
    stderr (torch.distributed.elastic's ChildFailedError): `rank : N (local_rank: L)`, then
    `exitcode : -9 (pid: P) (SIGKILL)`; a negative code is the signal that killed the rank."""

    _RANK = re.compile(r"^\s*rank\s*: (\d+) \(local_rank: \d+\)\s*$")
    _EXIT = re.compile(r"^\s*exitcode\s*: (-?\d+) \(pid: \d+\)")

    def __init__(self) -> None:
        self.rank: int | None = None
        self.codes: dict[int, int] = {}  # exit code by rank

    def read(self, line: str) -> None:
        if match := self._RANK.match(line):
            self.rank = int(match[1])
        elif (match := self._EXIT.match(line)) and self.rank is not None:
            self.codes[self.rank] = int(match[1])
            self.rank = None

    def killed(self) -> dict[int, str]:
        """How each rank a signal killed died, by rank: "killed by SIGKILL (out of memory?)"."""
        return {rank: killed_by(-code) for rank, code in self.codes.items() if code < 0}


def killed_by(signum: int) -> str:
    """ "killed by SIGKILL (out of memory?)": a rank's death by a signal, in the failure's headline."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = _SIGNAL_HINTS.get(signum)
    return f"killed by {name}" + (f" ({hint})" if hint else "")
