"""`mplaunch sweep`'s actions: list the points (--dry-run), run them here one after another, or hand
the unfinished ones to Slurm as one job array (launcher.run.sweep_slurm).

A local sweep runs each point as `python -m launcher RECIPE <the point's overrides>`, a child process
whose console is the user's (each run shows its own progress), under a header line naming the point. A
point whose run directory has FINISHED at its train.max_steps is skipped; any other starts, and resumes
from its latest checkpoint by itself. A failing point does not stop the others. Ctrl-C or SIGTERM is
passed on to the running point (which checkpoints and stops, as a run does) and no further point
starts. A table of every point's outcome ends the sweep.

Light side: no torch import.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from launcher.errors import UserError
from launcher.recipe.schema import Recipe
from launcher.run import sweep_slurm
from launcher.run.sweep import Point, Sweep, build, write_record
from launcher.rundir.layout import RunDir

PREFIX = "mplaunch sweep:"


@dataclass(frozen=True)
class State:
    """Where a point's run stands before the sweep starts it."""

    checkpoint_step: int | None
    """The step of its latest complete checkpoint (where it resumes), None without one."""
    max_steps: int
    finished: bool
    """FINISHED records its train.max_steps (or more): nothing left to run."""
    started: bool
    """Its run directory exists."""

    def describe(self) -> str:
        if self.finished:
            return "finished"
        if self.checkpoint_step is not None:
            return f"at step {self.checkpoint_step} of {self.max_steps}"
        return f"started, no checkpoint yet (0 of {self.max_steps})" if self.started else "new"


def state(sweep: Sweep, point: Point, recipe: Recipe) -> State:
    """The point's run, as its run directory shows it."""
    run = RunDir.of(sweep.run_dir(point), recipe.checkpoint.dir)
    done = run.finished_step()
    steps = run.checkpoint_steps() if run.path.is_dir() else []
    return State(
        checkpoint_step=steps[-1] if steps else None,
        max_steps=recipe.train.max_steps,
        finished=done is not None and done >= recipe.train.max_steps,
        started=run.path.is_dir(),
    )


def command(sweep: Sweep, point: Point) -> list[str]:
    """The point's run: the launcher on the sweep's recipe with the point's overrides."""
    return [sys.executable, "-m", "launcher", str(sweep.recipe), *sweep.run_overrides(point)]


def sweep(
    recipe: Path,
    arguments: Sequence[str],
    *,
    points_file: Path | None = None,
    name: str | None = None,
    dry_run: bool = False,
    slurm: bool = False,
    values: Mapping[str, Any] | None = None,
    template: Path | None = None,
    max_parallel: int | None = None,
) -> int:
    """`mplaunch sweep`: build the sweep (every refusal before anything runs), then list, run or submit it.

    `values`: the Slurm flags' recipe values (cli.slurm_values), for --slurm. Returns the exit code.
    """
    values = dict(values or {})
    _check_slurm_options(slurm, values, template, max_parallel)
    built, points, recipes = build(recipe, arguments, values, points_file, name)
    states = {p.name: state(built, p, recipes[p.name]) for p in points}
    todo = [p for p in points if not states[p.name].finished]
    if dry_run:
        show(built, points, states, slurm)
    if not slurm:
        if dry_run:
            return 0
        write_record(built)
        return run_points(built, points, states)
    if not dry_run:
        write_record(built)
    if not todo:
        print(f"{PREFIX} every point has finished; nothing to submit")
        return 0
    return sweep_slurm.submit(
        built, todo, values=values, template=template, max_parallel=max_parallel, dry_run=dry_run
    )


def _check_slurm_options(
    slurm: bool, values: Mapping[str, Any], template: Path | None, max_parallel: int | None
) -> None:
    sweep_slurm.check_max_parallel(max_parallel)
    given = [
        *values,
        *(["--slurm-template"] if template else []),
        *(["--max-parallel"] if max_parallel else []),
    ]
    if given and not slurm:
        raise UserError(
            f"mplaunch sweep: {given[0]} is for --slurm; a local sweep runs its points one after another"
        )


def show(sweep: Sweep, points: Sequence[Point], states: Mapping[str, State], slurm: bool) -> None:
    """The dry run: every point, its run directory and state, and what would run; nothing is written."""
    print(f"{PREFIX} dry run, nothing is started or written")
    print(f"recipe {sweep.recipe}")
    if sweep.fixed:
        print(f"every point: {' '.join(sweep.fixed)}")
    print(f"{len(points)} points in {sweep.dir}:")
    width = max(len(p.name) for p in points)
    for p in points:
        overrides = " ".join(p.overrides) or "(the recipe as it is)"
        print(f"  {p.index:>3}  {p.name:<{width}}  {overrides}")
        print(f"       {'':<{width}}  {sweep.run_dir(p)}: {states[p.name].describe()}")
    todo = [p for p in points if not states[p.name].finished]
    if not todo:
        print("every point has finished: nothing would run")
    elif slurm:
        print(f"would submit {len(todo)} of them to Slurm as one job array:")
    else:
        print(f"would run {len(todo)} of them here, one after another:")
        for p in todo:
            print(f"  {shlex.join(['mplaunch', *command(sweep, p)[3:]])}")


class _Stopper:
    """Ctrl-C and SIGTERM during a sweep: passed on to the running point, and no point starts after it.

    The point's launcher runs in its own session, so a terminal's Ctrl-C reaches it only through this
    (once: a second Ctrl-C is the launcher's "stop at once", and must stay the user's choice).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.child: subprocess.Popen[bytes] | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Stopper]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, argv: list[str]) -> int:
        """Run `argv` to its end with the console passed through; its exit status (-N: killed by signal N)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.child = subprocess.Popen(argv, start_new_session=True)
        if self.signum is not None:  # it came while the child was being started
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, self.signum)
        try:
            return self.child.wait()
        finally:
            self.child = None


def run_points(sweep: Sweep, points: Sequence[Point], states: Mapping[str, State]) -> int:
    """Run the points here, one after another; print the outcome table.

    Returns:
        0 when every point has finished, 128+N when signal N stopped the sweep, else 1.
    """
    outcomes: dict[str, str] = {}
    stopper = _Stopper()
    with stopper.installed():
        for number, point in enumerate(points, 1):
            where = f"point {number} of {len(points)}, {point.name}"
            if stopper.signum is not None:
                outcomes[point.name] = "not started (the sweep was stopped)"
            elif states[point.name].finished:
                print(f"{PREFIX} {where}: already finished, skipped: {sweep.run_dir(point)}", flush=True)
                outcomes[point.name] = "skipped: already finished"
            else:
                overrides = " ".join(point.overrides)
                print(f"{PREFIX} {where} ({overrides}): {sweep.run_dir(point)}", flush=True)
                code = stopper.run(command(sweep, point))
                outcomes[point.name] = _outcome(sweep, point, code, stopper.signum)
    print_summary(sweep, points, outcomes)
    if stopper.signum is not None:
        return 128 + stopper.signum
    ok = all(o == "finished" or o.startswith("skipped") for o in outcomes.values())
    return 0 if ok else 1


def _outcome(sweep: Sweep, point: Point, code: int, stopped_by: int | None) -> str:
    if code == 0:
        return "finished"
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    if stopped_by is not None:
        return f"stopped ({how}): a rerun resumes it"
    logs = RunDir.of(sweep.run_dir(point)).logs
    return f"failed: {how}" + (f" (logs: {logs})" if logs.is_dir() and any(logs.iterdir()) else "")


def print_summary(sweep: Sweep, points: Sequence[Point], outcomes: Mapping[str, str]) -> None:
    """The table that ends a sweep: every point, its outcome and run directory."""
    width = max(len(p.name) for p in points)
    print(f"\n{PREFIX} {len(points)} points in {sweep.dir}")
    print(f"  {'#':>3}  {'point':<{width}}  state")
    for p in points:
        print(f"  {p.index:>3}  {p.name:<{width}}  {outcomes[p.name]}")
    print(f"compare them: mplaunch compare {shlex.quote(str(sweep.dir))}", flush=True)
