"""The verbs that turn a recipe into a plan: `mplaunch RECIPE` (a dry run, a local launch or a
Slurm submission, `--resume RUN_DIR`), `check`, `plan` (the memory estimate) and `prepare`
(the token cache).

launcher.cli parses the arguments and locates the recipe file; each function here takes
plain values and returns the exit code, or raises UserError.

Light side: no torch import; `check` and `--dry-run` import none of the heavy libraries.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.plan import processes, resume
from launcher.plan.estimate import memory
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, prepare_vocab, resolve
from launcher.recipe import reference as recipe_reference
from launcher.recipe import schema as recipe_mod
from launcher.recipe import tasks
from launcher.run import launch, slurm, token_cache
from launcher.run.preflight import print_warnings
from launcher.rundir.layout import RunDir


def plan_recipe(
    path: Path,
    overrides: Sequence[str],
    values: Mapping[str, Any] | None = None,
    keep_machine_problems: bool = False,
    train_tokenizer: bool = False,
) -> Plan:
    """Load the recipe at `path` with the user's overrides and mplaunch's `values`, and plan it for this machine.

    `train_tokenizer`: a real launch, whose plan then knows the trained tokenizer's exact vocabulary.
    """
    recipe = recipe_mod.load(path, overrides, values)
    if train_tokenizer:
        prepare_vocab(recipe)
    return resolve(recipe, Hardware.probe(), keep_machine_problems=keep_machine_problems)


def start(
    path: Path, overrides: Sequence[str], values: Mapping[str, Any], *, dry_run: bool, resumed: bool
) -> int:
    """`mplaunch RECIPE`: print the plan (`dry_run`) or run it here.

    `resumed`: `--resume RUN_DIR`, whose `values` (resume_target) continue that run.
    """
    if resumed:
        values = {**values, **_keep_global_batch(path, overrides, values)}
    plan = plan_recipe(path, overrides, values, keep_machine_problems=dry_run, train_tokenizer=not dry_run)
    if dry_run:
        print("mplaunch dry run: nothing is started")
        print(plan.describe(memory.describe(plan)))
        # The whole plan is shown (it may be meant for another machine), but
        # the exit code is what a real run here would give: scripts that use
        # --dry-run as a pre-flight check must not be told "ok".
        if plan.problems:
            raise UserError([f"this machine cannot run the plan above: {p}" for p in plan.problems])
        return 0
    if resumed:
        # The saved recipe spells out every key, so each "has no effect" warning would fire on
        # defaults; the run's first start showed the ones that applied. Only keys changed now count.
        changed = {item.split("=", 1)[0] for item in overrides}
        print_warnings([w for w in plan.warnings if w.split(":", 1)[0] in changed])
    else:
        print_warnings(plan.warnings)
    return launch.run(plan)


def _keep_global_batch(path: Path, overrides: Sequence[str], values: Mapping[str, Any]) -> dict[str, Any]:
    """The batch values a resume at another world size needs (launcher.plan.resume.keep_global_batch);
    none when the world size is the checkpoint's. `values` are resume_target's (the run's folder)."""
    recipe = recipe_mod.load(path, overrides, values)
    found = RunDir.of(Path(values["logging.dir"]) / values["name"], recipe.checkpoint.dir).resume_point()
    if found.manifest is None:
        return {}
    hardware, ignored = Hardware.probe(), list[str]()
    world = processes.nproc(recipe, hardware, processes.device(recipe, hardware, ignored)[0], ignored)
    pinned = resume.keep_global_batch(found.manifest, world * recipe.launch.nnodes, list(overrides))
    if pinned is None:
        return {}
    print(
        f"mplaunch: resuming on {world * recipe.launch.nnodes} ranks, the checkpoint has "
        f"{found.manifest[resume.SIGNATURE_KEY]['world size']}: the global batch stays "
        f"{pinned['train.global_batch_size']} (grad_accum absorbs the change) and the workers reshard "
        "the checkpoint as they load it"
    )
    return pinned


def resume_target(run_dir: str, slurm_job: bool = False) -> tuple[str, dict[str, Any]]:
    """The saved recipe of the run in `run_dir` and the values that continue it there (`--resume RUN_DIR`).

    Raises:
        UserError: `slurm_job` (a Slurm job resumes by itself), not a run directory, or no
            complete checkpoint to resume from.
    """
    if slurm_job:
        raise UserError(
            "--resume: a Slurm job resumes by itself",
            hint=f"resubmit it: sbatch {shlex.quote(str(RunDir.of(run_dir).slurm_script))}",
        )
    path = Path(run_dir).resolve()
    saved = RunDir.of(path).recipe_file
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no {saved.name} in {path})")
    where = {"logging.dir": str(path.parent), "name": path.name}
    run = RunDir.of(path, recipe_mod.load(saved, values=where).checkpoint.dir)
    if run.resume_point().path is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint in {run.checkpoints}; nothing to resume")
    return str(saved), {**where, "checkpoint.resume": "auto"}


def submit(
    path: Path, overrides: Sequence[str], values: Mapping[str, Any], template: Path | None, *, dry_run: bool
) -> int:
    """`mplaunch RECIPE --slurm`: the recipe with the Slurm flags' `values`, rendered and submitted (or printed)."""
    return slurm.run(recipe_mod.load(path, overrides, values), template, dry_run=dry_run)


def check(path: Path | None, overrides: Sequence[str], *, explain: bool, markdown: bool) -> int:
    """`mplaunch check`: plan the recipe (when given) and say ok; `explain`: every recipe key."""
    if path is not None:
        plan = plan_recipe(path, overrides)
        print_warnings(plan.warnings)
        print(f"ok: {plan.recipe.source} ({plan.batch.equation(plan.nnodes, plan.nproc_per_node)})")
    if explain and markdown:
        print(recipe_reference.reference_markdown())
    elif explain:
        for key, type_, default, doc in recipe_reference.reference_rows():
            print(f"{key:<44} {type_:<34} {default:<10} {doc}")
    return 0


def estimate(
    path: Path, overrides: Sequence[str], gpu_memory: tuple[int, str] | None, num_params: int | None
) -> int:
    """`mplaunch plan`: the per-GPU memory under each ZeRO stage (launcher.plan.estimate.memory)."""
    hardware = Hardware.probe()
    recipe = recipe_mod.load(path, overrides)
    plan = resolve(recipe, hardware, nnodes_allowed=True, keep_machine_problems=True)
    memory.show(plan, hardware, gpu_memory, num_params)
    return 0


def prepare(path: Path, overrides: Sequence[str]) -> int:
    """`mplaunch prepare`: tokenize the recipe's data files into the token cache, training its tokenizer first."""
    started = time.perf_counter()
    plan = plan_recipe(path, overrides, keep_machine_problems=True, train_tokenizer=True)
    task = plan.model.task
    if plan.recipe.data.kind == "synthetic":
        raise UserError("mplaunch prepare: data.kind is synthetic; there is nothing to tokenize")
    if task in tasks.PER_RECORD:
        raise UserError(
            f"mplaunch prepare: data.task {task} tokenizes one record per row when a run starts; "
            "the token cache is for masked-lm and causal-lm"
        )
    try:
        cache, written = token_cache.ensure(
            plan.recipe, plan.data_paths, token_cache.tokenizer_of(plan), fallback=False
        )
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).is_relative_to(token_cache.cache_root()):
            raise UserError(
                f"mplaunch prepare: cannot write the token cache: {exc}",
                hint="set MPLAUNCH_CACHE to a writable directory",
            ) from None
        raise UserError(f"data.paths: {exc}") from None
    except ValueError as exc:
        raise UserError(f"data.paths: {exc}") from None
    print(
        f"{'prepared' if written else 'cached'} {cache.directory}: {cache.num_tokens} tokens, "
        f"{cache.num_documents} documents, {cache.size_bytes / 1e6:.2f} MB ({cache.dtype}), "
        f"{time.perf_counter() - started:.2f} s"
    )
    return 0
