"""`mplaunch sweep ... --slurm`: a sweep's points as ONE Slurm job array, an element per point.

Each point is prepared as `mplaunch RECIPE --slurm` prepares a run (launcher.run.slurm): resolved
for the cluster, its run directory written under its lock, its own job script in
RUN_DIR/slurm/job.sbatch (which `sbatch` resubmits alone). The array's script
(SWEEP_DIR/slurm/array.sbatch, from slurm/array.sbatch.j2) asks once for what every point asks,
and each element runs its point's job script with bash: that script's finished check, run lock,
torchrun on every node and requeue after a stop are a single job's. An element is named
ARRAY_INDEX (`123_4`) wherever it is requeued, signalled or recorded in a run's lock
(launcher.rundir.lock.Holder.this_process): Slurm reads one element's own job id as the whole array.

Points that ask the cluster for different things (nodes, time, ...) cannot share an array: such a
sweep is refused, naming the key. Finished points and points another run or job holds are skipped,
each with a line.

Light side: no torch import.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.errors import UserError
from launcher.plan.resolve import Plan, prepare_vocab
from launcher.recipe import schema as recipe_mod
from launcher.run import preflight, slurm, slurm_feasible
from launcher.run.sweep import Point, Sweep
from launcher.rundir.layout import RunDir
from launcher.rundir.lock import RunLock

ARRAY_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "array.sbatch.j2"
ARRAY_SCRIPT = "array.sbatch"
ELEMENT_LOG = "%A_%a"  # Slurm's array id and index, in the array's --output and --error
# What one element asks of the cluster (names of launcher.run.slurm.context), by the recipe key that sets it.
SHARED = {
    "nodes": "launch.nnodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem": "slurm.mem",
    "time": "slurm.time",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "signal_s": "slurm.signal_s",
    "extra_sbatch": "slurm.extra_sbatch",
}
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Job:
    """One point, resolved for the cluster, and its job script."""

    point: Point
    plan: Plan
    script: str

    @property
    def paths(self) -> slurm.Paths:
        return slurm.Paths(Path(self.plan.run_dir))


def submit(
    sweep: Sweep,
    todo: Sequence[Point],
    *,
    values: Mapping[str, Any],
    template: Path | None,
    max_parallel: int | None,
    dry_run: bool,
) -> int:
    """Submit the points `todo` of `sweep` as one job array (`dry_run`: print it, write nothing).

    `values` are the Slurm flags' recipe values; `template` the job template of each point
    (--slurm-template); `max_parallel` how many elements may run at once (None: no limit).

    Returns:
        0, or 1 when a point was refused by its preflight (named on stderr; the others are submitted).

    Raises:
        UserError: max_parallel below 1, a point's recipe is invalid, the points ask the cluster for
            different things, the array could never start, or sbatch refused it.
    """
    check_max_parallel(max_parallel)
    if not todo:
        print("mplaunch: every point of the sweep is finished or running; nothing to submit")
        return 0
    jobs = [_resolve(sweep, point, values, template, dry_run) for point in todo]
    refuse_mixed_requests(jobs)
    if dry_run:
        print(render_array(sweep, jobs, max_parallel), end="")
        print(f"mplaunch dry run: nothing submitted; {len(jobs)} points, one array element each:")
        for job in jobs:
            print(f"  {job.point.index}  {job.point.name}: {job.plan.run_dir}")
        return 0
    return _submit(sweep, jobs, max_parallel)


def check_max_parallel(max_parallel: int | None) -> None:
    """Raises UserError: --max-parallel below 1."""
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel}: at least 1 element must run at a time")


def _resolve(
    sweep: Sweep, point: Point, values: Mapping[str, Any], template: Path | None, dry_run: bool
) -> Job:
    try:
        recipe = recipe_mod.load(sweep.recipe, sweep.run_overrides(point), values)
        if not dry_run:  # the submitted plan knows the trained tokenizer's exact vocabulary
            prepare_vocab(recipe)
        plan = slurm.resolve_for_cluster(recipe)
        script = slurm.render(plan, template or slurm.DEFAULT_TEMPLATE)
    except UserError as exc:
        raise UserError([f"point {point.name}: {line}" for line in exc.lines]) from None
    assert Path(plan.run_dir) == sweep.run_dir(point), (plan.run_dir, sweep.run_dir(point))
    preflight.print_warnings(plan.warnings)
    return Job(point, plan, script)


def refuse_mixed_requests(jobs: Sequence[Job]) -> None:
    """One array asks the cluster for one thing: refuse points that differ in what they ask.

    Raises:
        UserError: each key whose value differs, with its values and the points that ask for each.
    """
    asked = [slurm.context(job.plan) for job in jobs]
    problems = []
    for name, key in SHARED.items():
        by_value: dict[str, list[str]] = {}
        for job, names in zip(jobs, asked, strict=True):
            by_value.setdefault(_shown(names[name]), []).append(job.point.name)
        if len(by_value) > 1:
            groups = "; ".join(f"{value} for {', '.join(points)}" for value, points in by_value.items())
            problems.append(f"{key} ({groups})")
    if problems:
        raise UserError(
            "sweep --slurm: one job array asks the cluster for the same resources for every point, but "
            f"the points differ in {' and '.join(problems)}; nothing was submitted",
            hint="sweep that key in separate sweeps (one per value), or run the sweep without --slurm",
        )


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return "none" if value is None else str(value)


def array_spec(indices: Sequence[int], max_parallel: int | None) -> str:
    """The --array value: the indices as ranges (`0-3`, `1,3`, `0-2,5`), then `%max_parallel`."""
    spans: list[list[int]] = []
    for index in sorted(set(indices)):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    spec = ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)
    return f"{spec}%{max_parallel}" if max_parallel is not None else spec


def array_context(sweep: Sweep, jobs: Sequence[Job], max_parallel: int | None) -> dict[str, Any]:
    """Everything slurm/array.sbatch.j2 may use; the resources are the first point's (every point's)."""
    first = slurm.context(jobs[0].plan)
    files = RunDir.of(sweep.dir)
    return {
        "version": __version__,
        "source": str(sweep.recipe),
        "sweep_dir": str(sweep.dir),
        "job_name": sweep.dir.name if JOB_NAME.fullmatch(sweep.dir.name) else "mplaunch-sweep",
        "array": array_spec([job.point.index for job in jobs], max_parallel),
        **{name: first[name] for name in SHARED},
        "signal": first["signal"],
        "slurm_dir": str(files.slurm_dir),
        "slurm_out": files.slurm_log("out", ELEMENT_LOG).name,
        "slurm_err": files.slurm_log("err", ELEMENT_LOG).name,
        "points": [
            {"index": job.point.index, "name": job.point.name, "script": str(job.paths.script)}
            for job in jobs
        ],
    }


def render_array(sweep: Sweep, jobs: Sequence[Job], max_parallel: int | None) -> str:
    """The array's sbatch script (slurm/array.sbatch.j2)."""
    return slurm.render_names(ARRAY_TEMPLATE, array_context(sweep, jobs, max_parallel))


def _submit(sweep: Sweep, jobs: Sequence[Job], max_parallel: int | None) -> int:
    sbatch = slurm.find_sbatch()
    with contextlib.ExitStack() as held:
        # Each point's lock is held until sbatch has answered, then left naming its element.
        ready, refused = [], 0
        for job in jobs:
            lock, ok = _take(job, held)
            ready += [(job, lock)] if lock is not None else []
            refused += not ok
        if not ready:
            print("mplaunch: no point left to submit")
            return 1 if refused else 0
        submitted = [job for job, _ in ready]
        script = render_array(sweep, submitted, max_parallel)
        # Before anything is written: an array no node can hold is refused, not left pending forever.
        slurm_feasible.check(sbatch, script, slurm.cluster_request(submitted[0].plan))
        for job in submitted:
            slurm.prepare_job(job.plan, job.script)
        array_file = RunDir.of(sweep.dir).slurm_dir / ARRAY_SCRIPT
        array_file.parent.mkdir(parents=True, exist_ok=True)
        array_file.write_text(script)
        array_id = slurm.run_sbatch(sbatch, array_file)
        for job, lock in ready:
            lock.release(keep=slurm.submitted(f"{array_id}_{job.point.index}"))
            _link_logs(sweep, job, array_id)
    _say_submitted(sweep, submitted, array_id, max_parallel, array_file)
    return 1 if refused else 0


def _take(job: Job, held: contextlib.ExitStack) -> tuple[RunLock | None, bool]:
    """The point's lock, when the point is to be submitted; (None, True): skipped (finished, or
    held by a live run or job), (None, False): refused by its preflight (said on stderr)."""
    name = job.point.name
    try:
        lock = held.enter_context(RunLock.acquire(job.paths.files.lock))
    except UserError as exc:
        print(f"mplaunch: point {name} skipped: {' '.join(exc.lines)}")
        return None, True
    try:
        if preflight.finished_run(job.plan, f"point {name} skipped"):
            lock.release()
            return None, True
        preflight.check_resume(job.plan)
    except UserError as exc:
        lock.release()
        print(f"error: point {name} not submitted: {' '.join(exc.lines)}", file=sys.stderr)
        return None, False
    return lock, True


def _link_logs(sweep: Sweep, job: Job, array_id: str) -> None:
    """RUN_DIR/slurm/slurm-ARRAY_INDEX.out (and .err): links to the element's logs in SWEEP_DIR/slurm."""
    element = f"{array_id}_{job.point.index}"
    for suffix in ("out", "err"):
        link = job.paths.log(suffix, element)
        with contextlib.suppress(OSError):  # a file system without links: the printed paths still say it
            link.unlink(missing_ok=True)
            link.symlink_to(RunDir.of(sweep.dir).slurm_log(suffix, element))


def _say_submitted(
    sweep: Sweep, jobs: Sequence[Job], array_id: str, max_parallel: int | None, array_file: Path
) -> None:
    at_once = min(max_parallel or len(jobs), len(jobs))
    names = ", ".join(f"{job.point.name} ({array_id}_{job.point.index})" for job in jobs)
    print(
        f"mplaunch: submitted job array {array_id} ({len(jobs)} points, at most {at_once} at a time): {names}"
    )
    logs = RunDir.of(sweep.dir).slurm_log("out", f"{array_id}_INDEX")
    print(f"mplaunch: script {array_file}; logs {logs} and .err (linked from each run dir's slurm/)")
    follow = shlex.quote(str(logs.parent)) + f"/slurm-{array_id}_*.out"
    print(f"mplaunch: sweep dir {sweep.dir}; follow with: squeue -j {array_id}; tail -f {follow}")
