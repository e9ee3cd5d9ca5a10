"""The run directory: one value that names every path of a run (README.md, "Run directory").

Every module that reads or writes a run's files asks a `RunDir` for the path;
no other module spells a file name of the run directory. It also owns the few
operations on those files that several modules share: preparing the directory,
the FINISHED marker, the resume point, the per-rank error reports (and which of
them caused a failure), the ranks' heartbeats, and the launcher's own events.
The lock file's protocol is launcher.rundir.lock's.

Light side: the standard library only (and the light checkpoint module), so the
launcher, `report` and `parity` use it without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from launcher.recipe.sections import Recipe
from launcher.rundir import checkpoint, ownership


class PlanPaths(Protocol):
    """What a run directory is found from: launcher.plan.resolve.Plan, which imports this module."""

    @property
    def run_dir(self) -> str: ...
    @property
    def recipe(self) -> Recipe: ...


PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.yaml"
COMMAND_FILE = "command.txt"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "FINISHED"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
LOGS_DIR = "logs"
MEMORY_DIR = "memory"
TENSORBOARD_DIR = "tb"
REPORT_DIR = "report"
SLURM_DIR = "slurm"
SLURM_SCRIPT = "job.sbatch"
SLURM_REQUEUES = "requeues.json"
_RANK = "rank-"  # logs/rank-N.err, logs/rank-N.heartbeat, logs/rank-N.stack, memory/rank-N.json
_HEARTBEAT = ".heartbeat"
_STACK = ".stack"
_ARCHIVED_METRICS = "metrics-"  # metrics-UNIXTIME.jsonl: an earlier attempt's metrics

# What a rank reports when another rank left or stalled: a closed or reset connection, a timed
# out or aborted collective. Such an error is a consequence; the cause is the other rank's.
SECONDARY = re.compile(
    r"connection (closed|reset) by peer|broken pipe|connection refused|"
    r"timed? ?out|timeout|watchdog|abort|NCCL communicator|DistBackendError|"
    r"process group.*(destroyed|shut ?down)|\bgloo\b.*(recv|send|read|write)|"
    r"^interrupted$|"
    # A save's temporary directory gone under a rank: another rank's failed save removed it.
    r"\.tmp-step-\d{8}\S* does not exist|no such file or directory: \S*\.tmp-step-\d{8}",
    re.IGNORECASE,
)


def is_secondary(message: str) -> bool:
    """True for an error a rank reports because another rank failed (see SECONDARY)."""
    return bool(SECONDARY.search(message.strip()))


def cause(errors: list[RankError]) -> RankError | None:
    """The error that failed the run, from errors in the order they happened: the first that is
    not a consequence of another rank leaving (is_secondary), else the first."""
    return next((e for e in errors if not is_secondary(e.message)), errors[0] if errors else None)


@dataclass(frozen=True)
class RankError:
    """What a failed rank wrote to logs/rank-N.err: the one-line message, then its traceback."""

    rank: int
    message: str
    path: Path

    @property
    def label(self) -> str:
        """The rank as the launcher names it ("rank-N", the file's stem)."""
        return self.path.stem

    @property
    def headline(self) -> str:
        """The failed run's one line, as the launcher prints it and records it as an "error" event."""
        return f"the run failed on {self.label}: {self.message}"


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory.

    Attributes:
        path: the run directory (logging.dir/name).
        checkpoints: this run's checkpoint root: PATH/checkpoints by default; checkpoint.dir (relative to `path`,
            or absolute) when it lies inside the run directory, else checkpoint.dir/NAME, the run's own folder in a directory runs may share.
        shared: that shared checkpoint.dir (where an older mplaunch wrote checkpoints of
            every run straight in: launcher.rundir.ownership), or None.
    """

    path: Path
    checkpoints: Path
    shared: Path | None = None

    @classmethod
    def of(cls, path: str | Path, checkpoint_dir: str | None = None) -> RunDir:
        """A run directory from its path and checkpoint.dir (None: the default)."""
        path = Path(path)
        if not checkpoint_dir:
            return cls(path, path / CHECKPOINTS_DIR)
        chosen = path / checkpoint_dir  # an absolute checkpoint.dir replaces the run directory in the join
        run, where = Path(os.path.abspath(path)), Path(os.path.abspath(chosen))
        if where == run or run in where.parents:
            return cls(path, chosen)
        return cls(path, chosen / run.name, shared=chosen)

    @classmethod
    def from_plan(cls, plan: PlanPaths) -> RunDir:
        """The run directory a plan (launcher.plan.resolve.Plan) names."""
        return cls.of(plan.run_dir, plan.recipe.checkpoint.dir)

    # ------------------------------------------------------------------ paths

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def command_file(self) -> Path:
        return self.path / COMMAND_FILE

    @property
    def env_file(self) -> Path:
        return self.path / ENV_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def archived_metrics(self, stamp: int) -> Path:
        """Where a fresh start keeps an earlier attempt's metrics (`stamp`: Unix seconds)."""
        return self.path / f"{_ARCHIVED_METRICS}{stamp}.jsonl"

    @property
    def finished(self) -> Path:
        return self.path / FINISHED_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def tokenizer(self) -> Path:
        """The tokenizer trained on the data files when data.tokenizer is not set."""
        return self.path / TOKENIZER_DIR

    @property
    def logs(self) -> Path:
        return self.path / LOGS_DIR

    def rank_error(self, rank: int) -> Path:
        return self.logs / f"{_RANK}{rank}.err"

    def heartbeat(self, rank: int) -> Path:
        """A rank's last sign of life: step, time, pid, phase (launcher.rundir.watchdog) and detail."""
        return self.logs / f"{_RANK}{rank}{_HEARTBEAT}"

    def stack_dump(self, rank: int) -> Path:
        """Where a rank's Python stacks (all threads) go when the launcher sends it SIGUSR2."""
        return self.logs / f"{_RANK}{rank}{_STACK}"

    @property
    def memory(self) -> Path:
        return self.path / MEMORY_DIR

    def memory_report(self, rank: int) -> Path:
        return self.memory / f"{_RANK}{rank}.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def trackers(self) -> Path:
        return self.path / "trackers.json"  # the W&B and MLflow run ids, which a resumed run continues

    @property
    def report(self) -> Path:
        """Where `mplaunch report` draws its plots by default."""
        return self.path / REPORT_DIR

    @property
    def slurm_dir(self) -> Path:
        return self.path / SLURM_DIR

    @property
    def slurm_script(self) -> Path:
        return self.slurm_dir / SLURM_SCRIPT

    def slurm_log(self, suffix: str, job_id: str = "%j") -> Path:
        """The job's stdout ("out") or stderr ("err"); "%j" is Slurm's job-id pattern."""
        return self.slurm_dir / f"slurm-{job_id}.{suffix}"

    @property
    def slurm_requeues(self) -> Path:
        """Requeues per job id (slurm.max_requeues)."""
        return self.slurm_dir / SLURM_REQUEUES

    # ------------------------------------------------------------------ launcher side

    def prepare(self, plan_json: str, recipe_yaml: str, command: str, env_json: str) -> Path:
        """Create the directory and write plan.json, recipe.yaml, command.txt and env.json atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.plan_file, plan_json),
            (self.recipe_file, recipe_yaml),
            (self.command_file, command),
            (self.env_file, env_json),
        ):
            checkpoint.write_atomic(path, text)
        return self.path

    def is_run_dir(self) -> bool:
        """True if a launch wrote this directory (it holds plan.json)."""
        return self.plan_file.is_file()

    def archive_metrics(self) -> Path | None:
        """Move metrics.jsonl aside (metrics-UNIXTIME.jsonl); returns where it went, if it existed."""
        if not self.metrics.exists():
            return None
        archived = self.archived_metrics(int(time.time()))
        self.metrics.rename(archived)
        return archived

    def remove_tokenizer(self) -> None:
        shutil.rmtree(self.tokenizer, ignore_errors=True)

    def finished_step(self) -> int | None:
        """The step FINISHED records, or None when the run has not finished."""
        if not self.finished.exists():
            return None
        return int(json.loads(self.finished.read_text() or "{}").get("step", 0))

    def write_finished(self, step: int) -> None:
        checkpoint.write_atomic(self.finished, json.dumps({"step": step, "time": time.time()}) + "\n")

    def clear_finished(self) -> None:
        self.finished.unlink(missing_ok=True)

    def resume_point(self) -> checkpoint.Found:
        """The latest complete checkpoint (or none), and the torn directories skipped on the way;
        this run's checkpoints in the older shared layout until the launcher moves them."""
        return ownership.resume_point(self.checkpoints, self.shared)

    def complete_checkpoints(self) -> list[tuple[Path, dict[str, Any]]]:
        """The complete checkpoints and their manifests, the highest step first (by the same rules)."""
        return ownership.complete(self.checkpoints, self.shared)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, by the resume point's rules (a valid manifest)."""
        return sorted(int(m["step"]) for _, m in self.complete_checkpoints())

    def foreign(self, manifest: dict[str, Any]) -> str | None:
        """The other run directory that wrote a checkpoint in this run's folder (launcher.rundir.ownership)."""
        return None if self.shared is None else ownership.foreign(manifest, self.path)

    # ------------------------------------------------------------------ rank errors

    def write_rank_error(self, rank: int, message: str, details: str) -> Path | None:
        """A failed rank's report: `message` (one line) first, a blank line, then `details` (a traceback).

        Never raises: on a full disk it is the line alone if that fits, else no file at all (the
        caller printed the line before) and None is returned.
        """
        path = self.rank_error(rank)
        for text in (f"{message}\n\n{details}", f"{message}\n"):  # the line alone may still fit
            try:
                self.logs.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                return path
            except OSError:
                continue
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # an empty report would hide the line the rank printed
        return None

    def append_event(self, step: int, event: str, message: str) -> bool:
        """Append an event record to metrics.jsonl, in the workers' format; False when it could not.

        The launcher uses it for what the workers could not record themselves (an "error"
        after they failed). Never raises: a full disk must not hide the error it records.
        """
        record = {"kind": "event", "step": step, "time": time.time(), "event": event, "message": message}
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            return False
        return True

    def last_step(self) -> int:
        """The highest step metrics.jsonl records (0 without one); half-written lines are skipped."""
        step = 0
        try:
            with open(self.metrics, errors="replace") as lines:
                for line in lines:
                    try:
                        value = json.loads(line).get("step")
                    except (ValueError, AttributeError):
                        continue
                    step = max(step, value) if isinstance(value, int) else step
        except OSError:
            return 0
        return step

    # ------------------------------------------------------------------ heartbeats

    def write_heartbeat(self, rank: int, step: int, phase: str, detail: str | None = None) -> None:
        """Rewrite this rank's heartbeat (a rename, no fsync: it must stay cheap). Never raises.
        `detail`: what the rank is doing since this beat ("building the model"), which the bar shows."""
        path = self.heartbeat(rank)
        tmp = path.with_name(path.name + ".tmp")
        beat = {"rank": rank, "step": step, "time": time.time(), "pid": os.getpid(), "phase": phase}
        beat.update({"detail": detail} if detail else {})
        try:
            tmp.write_text(json.dumps(beat))
            tmp.replace(path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk keeps the last beat and nothing beside it

    def heartbeats(self) -> dict[int, dict[str, object]]:
        """Every rank's latest heartbeat, by rank; unreadable ones are left out."""
        beats: dict[int, dict[str, object]] = {}
        for path in self.logs.glob(f"{_RANK}*{_HEARTBEAT}"):
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(beat, dict) and isinstance(beat.get("rank"), int):
                beats[beat["rank"]] = beat
        return beats

    def clear_heartbeats(self) -> None:
        """Remove an earlier attempt's heartbeats and stack dumps, which would be taken for this one's."""
        for pattern in (f"{_RANK}*{_HEARTBEAT}", f"{_RANK}*{_STACK}"):
            for stale in self.logs.glob(pattern):
                stale.unlink(missing_ok=True)

    def rank_errors(self) -> list[RankError]:
        """Every rank's error report, the earliest written first (ties: the lower rank).

        The first rank to fail is the cause; the others usually fail after it, because it left (a closed connection, a timed-out collective).
        """
        found = []
        for path in self.logs.glob(f"{_RANK}*.err"):
            number = path.stem.removeprefix(_RANK)
            try:
                text, written = path.read_text(), path.stat().st_mtime
            except OSError:
                continue
            if number.isdigit() and text.strip():
                found.append(
                    (written, int(number), RankError(int(number), text.split("\n\n", 1)[0].strip(), path))
                )
        return [error for _, _, error in sorted(found, key=lambda item: item[:2])]

    def first_rank_error(self) -> RankError | None:
        """The error that failed the run: the earliest written that is not another rank's consequence (`cause`)."""
        return cause(self.rank_errors())

    def failed_rank(self, printed: list[RankError] | None = None) -> RankError | None:
        """The rank error that failed the run, from the error files and, for ranks whose file is
        missing (a full disk), the error lines they `printed`, in the order they came."""
        written = self.rank_errors()
        have = {e.rank for e in written}
        return cause(written + [e for e in printed or [] if e.rank not in have])

    def clear_rank_errors(self) -> None:
        """Remove an earlier attempt's error reports, which would be mistaken for this one's."""
        for stale in self.logs.glob(f"{_RANK}*.err"):
            stale.unlink()
