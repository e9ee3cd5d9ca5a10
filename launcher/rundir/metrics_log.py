"""Reading a run directory after the fact: its metrics log, what its plan says, and its state.

`read_metrics` gives one record per (kind, step) across resumes; `read_run_info` the run's
name, steps and precision from plan.json (or recipe.yaml); `run_state` whether it finished,
runs, waits in a queue, stopped or crashed. Every path is relative to RUN_DIR (launcher.rundir.layout),
and plan.json, checkpoints/ and FINISHED are read only when they are there, so finished, running
(a truncated last line), crashed and copied run directories all read. `mplaunch report`,
`mplaunch parity`, the launcher and the Slurm requeue helper read runs through this module.

Light side: the standard library (PyYAML only for a run without plan.json).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.rundir.layout import FINISHED_FILE, METRICS_FILE, RunDir
from launcher.rundir.lock import holder_if_held

# A run with no FINISHED file whose last record is older than this, and older than three logging
# intervals, is taken to be dead rather than still running.
STALE_AFTER_S = 600.0
LIFECYCLE_EVENTS = ("start", "resume", "stop", "interrupted", "finish", "error")

Record = dict[str, Any]


@dataclass(frozen=True)
class Metrics:
    """A run's metrics.jsonl with the steps replayed after a resume reduced to their latest record.

    Attributes:
        train: "train" records, one per step (the latest written), sorted by step.
        eval: "eval" records, likewise.
        events: "event" records in file order, the latest per (event, step).
        precision: "precision" records (the precision x-ray), one per step, sorted by step.
        resumes: steps training resumed from (a "resume" event's from_step, or a step seen again).
        bad_lines: lines that were not a JSON record, such as the half-written last line of a live run.
    """

    train: tuple[Record, ...]
    eval: tuple[Record, ...]
    events: tuple[Record, ...]
    resumes: tuple[int, ...]
    bad_lines: int = 0
    precision: tuple[Record, ...] = ()

    def series(self, key: str, kind: str = "train") -> tuple[list[int], list[float]]:
        """Steps and values of `key` in the train (or eval) records, skipping nulls."""
        records = self.eval if kind == "eval" else self.train
        pairs = [(r["step"], float(r[key])) for r in records if is_number(r.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def named(self, event: str) -> list[Record]:
        return [e for e in self.events if e.get("event") == event]

    def times(self) -> list[float]:
        return sorted(r["time"] for r in (*self.train, *self.eval, *self.events) if is_number(r.get("time")))

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in (*self.train, *self.eval, *self.events)), default=0)


def read_metrics(run_dir: str | Path) -> Metrics:
    """Read RUN_DIR/metrics.jsonl, keeping the latest record per (kind, step) across resumes.

    Raises:
        UserError: the directory or the file is missing, or the file holds no record.
    """
    path = _metrics_path(Path(run_dir))
    latest: dict[tuple[Any, ...], tuple[int, Record]] = {}
    resumes: list[int] = []
    bad_lines, last_train_step, resumed = 0, -1, False
    with path.open(encoding="utf-8", errors="replace") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad_lines += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                bad_lines += 1
                continue
            kind, step = record.get("kind"), record["step"]
            if kind == "event" and record.get("event") == "resume":
                resumes.append(int(record["from_step"]) if "from_step" in record else step)
                resumed = True
            elif kind == "train":
                # A step logged again with no resume event before it still means a restart.
                if step <= last_train_step and not resumed:
                    resumes.append(step)
                resumed, last_train_step = False, step
            key = (kind, record.get("event"), step) if kind == "event" else (kind, step)
            latest[key] = (index, record)
    if not latest:
        raise UserError(f"{path}: no records yet (empty or unreadable file)")
    ordered = [record for _, record in sorted(latest.values(), key=lambda pair: pair[0])]

    def by_step(kind: str) -> tuple[Record, ...]:
        return tuple(sorted((r for r in ordered if r.get("kind") == kind), key=lambda r: r["step"]))

    events = tuple(r for r in ordered if r.get("kind") == "event")
    resumed_at = tuple(sorted(set(resumes)))
    return Metrics(by_step("train"), by_step("eval"), events, resumed_at, bad_lines, by_step("precision"))


def _metrics_path(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = RunDir.of(run_dir).metrics
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE}", hint="is this a run directory (logging.dir/name)?")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty; the run has not logged a step yet")
    return path


@dataclass(frozen=True)
class RunInfo:
    """What plan.json (or recipe.yaml) says about the run; every field is optional."""

    name: str
    max_steps: int | None = None
    dtype: str | None = None
    device: str | None = None
    checkpoint_dir: str | None = None  # checkpoint.dir; None: the default

    @property
    def context(self) -> str:
        return " · ".join(x for x in (self.name, self.dtype, self.device) if x)


def read_run_info(run_dir: Path) -> RunInfo:
    """Name, max_steps, dtype, device and checkpoint.dir from plan.json, else recipe.yaml, else
    the directory name."""
    recipe: dict[str, Any] = {}
    plan: dict[str, Any] = {}
    files = RunDir.of(run_dir)
    try:
        data = json.loads(files.plan_file.read_text())
        recipe, plan = data.get("recipe") or {}, data.get("plan") or {}
    except (OSError, ValueError, AttributeError):
        try:
            import yaml

            recipe = yaml.safe_load(files.recipe_file.read_text()) or {}
        except (OSError, ValueError):
            pass
    recipe = recipe if isinstance(recipe, dict) else {}
    max_steps = (recipe.get("train") or {}).get("max_steps")
    dtype = (plan.get("precision") or {}).get("dtype") or (recipe.get("precision") or {}).get("dtype")
    checkpoint_dir = (recipe.get("checkpoint") or {}).get("dir")
    return RunInfo(
        name=str(recipe.get("name") or run_dir.resolve().name),
        max_steps=max_steps if isinstance(max_steps, int) else None,
        dtype=dtype if isinstance(dtype, str) else None,
        device=plan.get("device") if isinstance(plan.get("device"), str) else None,
        checkpoint_dir=checkpoint_dir if isinstance(checkpoint_dir, str) else None,
    )


def run_state(run_dir: Path, metrics: Metrics, now: float | None = None) -> tuple[str, str]:
    """("finished" | "running" | "queued" | "stopped" | "crashed", a detail) from FINISHED, events,
    the lock and staleness.

    A run directory whose lock file nobody holds (launcher.rundir.lock) is not running, however
    recent its last record; one without a lock file (older runs, some copies) is judged by
    how long it has been silent.
    """
    if RunDir.of(run_dir).finished_step() is not None:
        return "finished", ""
    last = next((e for e in reversed(metrics.events) if e.get("event") in LIFECYCLE_EVENTS), {})
    where = f"at step {last.get('step')}"
    message = str(last.get("message") or "").strip().splitlines()
    if message:
        where += f": {message[-1][:100]}"
    if last.get("event") == "finish":
        return "finished", f"finish event, but no {FINISHED_FILE} file"
    if last.get("event") in ("error", "stop", "interrupted"):
        return ("crashed" if last["event"] == "error" else "stopped"), where
    files = RunDir.of(run_dir)
    try:
        holder = holder_if_held(files.lock)
    except OSError:
        pass  # no lock file: judge by the records alone
    else:
        if holder is None:
            return "crashed", (
                f"no {FINISHED_FILE} file, no process holds its {files.lock.name}; "
                f"last record at step {metrics.last_step}"
            )
        if holder.state == "submitted":
            return "queued", holder.describe()
    times = metrics.times()
    if not times:
        return "crashed", f"no {FINISHED_FILE} file and no timestamps"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    stale_after = max(STALE_AFTER_S, 3 * statistics.median(gaps)) if gaps else STALE_AFTER_S
    age = (time.time() if now is None else now) - times[-1]
    if age <= stale_after:
        return "running", f"last record {format_duration(max(age, 0))} ago"
    return "crashed", f"no {FINISHED_FILE} file, and no record for {format_duration(age)}"


def format_duration(seconds: float) -> str:
    """45s, 3m 07s, 2h 05m 09s or 3d 4h: a wall time or a silence, as the report and launcher print it."""
    s = int(round(seconds))
    if s >= 2 * 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def is_number(x: object) -> bool:
    """A JSON number (an int or float, not a bool): a value a record may hold for a metric."""
    return isinstance(x, int | float) and not isinstance(x, bool)
