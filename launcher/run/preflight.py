"""Before any worker starts, locally (launcher.run.launch) or as a Slurm job (launcher.run.slurm).

The starter shows the plan's warnings (`print_warnings`); then, under the run directory's
lock, `finished_run` says whether anything is left to train, `check_resume` what the run will
resume from (tidying the run's checkpoint folder first, refusing checkpoints this plan cannot
use or may not touch, and a train.max_steps below the steps the run has trained: it would train
nothing), and `prepare_run_dir` writes the files the workers and a later `--resume` read:
plan.json, recipe.yaml, command.txt, env.json. A full disk on the way is one
line (launcher.rundir.space), never a traceback, and leaves no temporary file behind.

Light side: no torch import.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from launcher.errors import UserError
from launcher.plan import resume
from launcher.plan.resolve import Plan
from launcher.recipe.schema import to_dict
from launcher.run import environment, token_cache
from launcher.rundir import checkpoint, ownership, space
from launcher.rundir.layout import RunDir


def print_warnings(warnings: Sequence[str]) -> None:
    """Each of a plan's warnings as one `warning:` line on stderr."""
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def prepare_run_dir(plan: Plan) -> Path:
    """Create RUN_DIR and write plan.json, recipe.yaml, command.txt and env.json into it, and the
    tokenizer trained on the data files (RUN_DIR/tokenizer): the workers only read it."""
    run_dir = RunDir.from_plan(plan)
    with space.refused_when_full(run_dir.path):
        path = run_dir.prepare(
            plan_json=plan.to_json(),
            recipe_yaml=yaml.safe_dump(_standalone_recipe(plan), sort_keys=False),
            command=plan.command_line() + "\n",
            env_json=json.dumps(environment.snapshot(), indent=2) + "\n",
        )
        token_cache.place_tokenizer(plan)
    return path


def _standalone_recipe(plan: Plan) -> dict[str, object]:
    """The resolved recipe with its file paths made absolute, so RUN_DIR/recipe.yaml loads from
    anywhere (`mplaunch --resume RUN_DIR`)."""
    recipe = to_dict(plan.recipe)
    recipe["logging"]["dir"] = str(Path(plan.run_dir).parent)
    recipe["data"]["paths"] = list(plan.data_paths)
    if plan.tokenizer_dir is not None:
        recipe["data"]["tokenizer"] = plan.tokenizer_dir
    if plan.hf_dir is not None:
        recipe["model"]["hf"] = plan.hf_dir
    if plan.init_from is not None:
        recipe["model"]["init_from"] = plan.init_from
    return recipe


def check_resume(plan: Plan) -> str | None:
    """What the run will resume from, or None for a fresh start.

    First the run's checkpoint folder is tidied (`tidy`). Then a checkpoint another run wrote,
    checkpoints that all failed verification, or checkpoints a fresh start would bury stop the
    start: nothing is trained beside them or over them.

    Raises:
        UserError: the run directory holds a checkpoint this plan cannot use, another run's
            checkpoints, only corrupt ones (checkpoint.resume=auto), or checkpoints a fresh
            start would bury (checkpoint.resume=never); a train.max_steps below the steps the run
            has trained; or the disk is full.
    """
    run_dir = RunDir.from_plan(plan)
    tidy(run_dir)
    found = run_dir.resume_point()
    _refuse_foreign(run_dir)
    corrupt = checkpoint.corrupt(run_dir.checkpoints)
    if found.path is None and corrupt and plan.recipe.checkpoint.resume == "auto":
        names = ", ".join(p.name for p in corrupt)
        raise UserError(
            f"{run_dir.checkpoints}: no checkpoint passed verification ({names}, kept for inspection); "
            f"nothing was started, and the run is refused {ownership.UNTIL_MOVED}"
        )
    # The one warning about torn checkpoints: the workers skip them silently.
    for line in found.ignored:
        print(f"mplaunch: warning: checkpoint {line}", file=sys.stderr)
    if found.path is None or found.manifest is None:
        return None
    if plan.recipe.checkpoint.resume == "never":
        raise UserError(
            f"{run_dir.checkpoints}: holds checkpoints of an earlier run and checkpoint.resume is never; "
            "nothing was started so nothing is overwritten",
            hint="use another name, or checkpoint.resume=auto to continue it",
        )
    lines = resume.check(found.manifest, plan, str(found.path))
    trained = max(int(found.manifest["step"]), run_dir.finished_step() or 0)
    _refuse_fewer_steps(plan, trained)
    if trained < plan.recipe.train.max_steps:  # else nothing trains: `finished_run` says so, and only that
        for line in lines:
            print(f"mplaunch: {line}", file=sys.stderr)
    return f"step {found.manifest['step']} ({found.path})"


def _refuse_fewer_steps(plan: Plan, trained: int) -> None:
    """A train.max_steps below the steps the run has trained would train nothing: refused, rather
    than applied and then skipped.

    Raises:
        UserError: `trained` is more than train.max_steps.
    """
    if trained > plan.recipe.train.max_steps:
        raise UserError(
            f"{plan.run_dir}: the run already has {trained} steps, and train.max_steps is "
            f"{plan.recipe.train.max_steps}",
            hint=f"train.max_steps must exceed {trained} to train more, or use another name to start afresh; "
            "nothing was started",
        )


def tidy(run_dir: RunDir) -> None:
    """Before a start (under the run's lock): move this run's checkpoints that an older mplaunch
    wrote straight into a shared checkpoint.dir into the run's own folder, and remove what an
    interrupted save left in it (`.tmp-step-N`: a second Ctrl-C, a kill, a full disk). Says what it did.

    Raises:
        UserError: the disk is full (a move needs the folder made).
    """
    with space.refused_when_full(run_dir.checkpoints):
        if run_dir.shared is not None:
            moved = ownership.adopt(run_dir.shared, run_dir.checkpoints, run_dir.path.name)
            if moved:
                print(
                    f"mplaunch: checkpoint.dir {run_dir.shared} keeps one folder per run now: moved this run's "
                    f"{', '.join(moved)} (written by an older mplaunch) into {run_dir.checkpoints}",
                    file=sys.stderr,
                )
        removed = checkpoint.clear_leftovers(run_dir.checkpoints)
    if removed:
        print(
            f"mplaunch: removed {', '.join(removed)} from {run_dir.checkpoints}: "
            "left by a save that did not finish",
            file=sys.stderr,
        )


def _refuse_foreign(run_dir: RunDir) -> None:
    """Stop when the run's folder of a shared checkpoint.dir holds another run's checkpoints."""
    for path, manifest in checkpoint.newest_first(run_dir.checkpoints):
        other = run_dir.foreign(manifest)
        if other is not None:
            raise UserError(
                f"{path}: written by the run {other}, which has the same name and checkpoint.dir; "
                "nothing was started so neither run's checkpoints are touched",
                hint="give one of them another name or checkpoint.dir",
            )


def finished_run(plan: Plan, then: str) -> bool:
    """True (and says so) if the run directory has finished train.max_steps already.

    A FINISHED file for fewer steps (train.max_steps was raised) is removed, so the run
    trains on from its last checkpoint.

    Raises:
        UserError: the run finished more steps than train.max_steps (`_refuse_fewer_steps`).
    """
    run_dir = RunDir.from_plan(plan)
    done = run_dir.finished_step()
    if done is None:
        return False
    _refuse_fewer_steps(plan, done)
    if done == plan.recipe.train.max_steps:
        print(f"mplaunch: {plan.run_dir} already finished {done} steps; {then}")
        return True
    run_dir.clear_finished()
    return False
