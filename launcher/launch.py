"""Start a plan's workers on this node: the run directory, torchrun, signals, exit status.

Light side: no torch import. The launcher checks that a resume is possible
before any worker starts, starts torchrun in its own session, forwards
Ctrl-C and SIGTERM to the workers (which checkpoint and stop at the next
step boundary), and turns a failing rank into one readable message.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import yaml

from launcher import checkpoint
from launcher.errors import UserError
from launcher.plan import Plan
from launcher.recipe import to_dict
from launcher.rundir import RunDir


def prepare_run_dir(plan: Plan) -> Path:
    """Create RUN_DIR and write plan.json, recipe.yaml, command.txt and env.json into it."""
    return RunDir.from_plan(plan).prepare(
        plan_json=plan.to_json(),
        recipe_yaml=yaml.safe_dump(_standalone_recipe(plan), sort_keys=False),
        command=plan.command_line() + "\n",
        env_json=json.dumps(environment(), indent=2) + "\n",
    )


def _standalone_recipe(plan: Plan) -> dict[str, object]:
    """The resolved recipe with its file paths made absolute, so RUN_DIR/recipe.yaml loads from
    anywhere (`mplaunch --resume RUN_DIR`)."""
    recipe = to_dict(plan.recipe)
    recipe["data"]["paths"] = list(plan.data_paths)
    if plan.tokenizer_dir is not None:
        recipe["data"]["tokenizer"] = plan.tokenizer_dir
    return recipe


def environment() -> dict[str, object]:
    """Versions, host and git commit: enough to reproduce or report a run."""
    versions: dict[str, str | None] = {}
    for dist in ("mplaunch", "torch", "deepspeed", "accelerate", "transformers", "tokenizers", "pydantic"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "cwd": os.getcwd(),
        "argv": sys.argv,
        "git_commit": _git_commit(),
        "versions": versions,
        "time": time.time(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
    return out + ("-dirty" if dirty.strip() else "")


def check_resume(plan: Plan) -> str | None:
    """What the run will resume from, or None for a fresh start.

    Raises:
        UserError: the run directory holds a checkpoint this plan cannot use,
            or checkpoints a fresh start would bury (checkpoint.resume=never).
    """
    run_dir = RunDir.from_plan(plan)
    found = run_dir.resume_point()
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
    problems = checkpoint.mismatch(found.manifest, checkpoint.structure(plan))
    if problems:
        raise UserError(
            f"cannot resume from {found.path}: {'; '.join(problems)}",
            hint=f"resume with the checkpoint's settings (backend={found.manifest['backend']} "
            f"zero.stage={found.manifest['zero_stage']}, world size {found.manifest['world_size']}), "
            "or start afresh under another name",
        )
    changed = checkpoint.changed_keys(found.manifest.get("recipe", {}), to_dict(plan.recipe))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        print(f"mplaunch: warning: resuming with changed settings: {shown}", file=sys.stderr)
    return f"step {found.manifest['step']} ({found.path})"


def run(plan: Plan) -> int:
    """Run the plan's workers to completion; return their exit status (128+N after signal N)."""
    resume_from = check_resume(plan)
    run_dir = RunDir.from_plan(plan)
    if finished_run(plan, "nothing to do (raise train.max_steps to train further, or use another name)"):
        return 0
    if resume_from is None:
        run_dir.archive_metrics()  # a fresh start keeps the earlier attempt's metrics beside the new ones
        # A tokenizer trained for an earlier attempt may not match today's data files.
        run_dir.remove_tokenizer()
    prepare_run_dir(plan)
    run_dir.clear_rank_errors()
    print(f"mplaunch: {plan.batch.equation(plan.nnodes, plan.nproc_per_node)}")
    print(
        f"mplaunch: {plan.recipe.backend}, ZeRO {plan.recipe.zero.stage}, {plan.precision.dtype} on "
        f"{plan.device}; run dir {run_dir.path}"
    )
    if resume_from:
        print(f"mplaunch: resuming from {resume_from}")
    return Workers(plan).wait()


def finished_run(plan: Plan, then: str) -> bool:
    """True (and says so) if the run directory has finished train.max_steps already.

    A FINISHED file for fewer steps (train.max_steps was raised) is removed, so the run
    trains on from its last checkpoint.
    """
    run_dir = RunDir.from_plan(plan)
    done = run_dir.finished_step()
    if done is None:
        return False
    if done >= plan.recipe.train.max_steps:
        print(f"mplaunch: {plan.run_dir} already finished {done} steps; {then}")
        return True
    run_dir.clear_finished()
    return False


class Workers:
    """torchrun and its workers, in their own session so that a terminal's Ctrl-C reaches only us."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.signals: list[int] = []
        env = {**os.environ, **plan.env}
        self.proc = subprocess.Popen(
            plan.command,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.noise = _TorchrunFilter()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        self.previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self.noise.keep(line):
                sys.stderr.write(line)
                sys.stderr.flush()

    def _forward(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            # The workers checkpoint and exit at the next step boundary; torchrun itself would
            # kill them after 30 s, so it is left alone.
            targets = child_pids(self.proc.pid) or [self.proc.pid]
            print(
                f"\nmplaunch: {signal.Signals(signum).name}: asking the workers to checkpoint and stop "
                "(again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        else:
            targets = [self.proc.pid]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def wait(self) -> int:
        try:
            code = self.proc.wait()
        finally:
            self.reader.join(timeout=5)
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        if code != 0 and not self.signals:
            _report_failure(self.plan, code)
        if self.signals:
            return 128 + self.signals[0] if code == 0 else code
        return code


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL.

    torchrun runs in its own session (so a terminal's Ctrl-C reaches only the
    launcher); without this, killing the launcher would leave it training
    unattended. torchrun passes the SIGTERM on to its workers.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_pids(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's are the workers); Linux /proc, empty elsewhere."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


class _TorchrunFilter:
    """Drops torchrun's own log lines and its ChildFailedError traceback; workers' lines pass."""

    _LOG = re.compile(r"^\s*(\[?[WEI]\d{4} |\[rank\d+\]:|torch\.distributed\.elastic|W\d{4}|E\d{4}|I\d{4})")
    _BANNER = re.compile(r"^(=+|-+)$")

    def __init__(self) -> None:
        self.in_traceback = False

    def keep(self, line: str) -> bool:
        stripped = line.rstrip("\n")
        if stripped.startswith("Traceback (most recent call last):"):
            # Workers never print tracebacks (they write them to RUN_DIR/logs); this one is torchrun's.
            self.in_traceback = True
        if self.in_traceback:
            return False
        return not (self._LOG.match(stripped) or self._BANNER.match(stripped.strip()))


def _report_failure(plan: Plan, code: int) -> None:
    run_dir = RunDir.from_plan(plan)
    first = run_dir.first_rank_error()
    if first is not None:
        print(f"mplaunch: the run failed on {first.label}: {first.message}", file=sys.stderr)
        print(f"mplaunch: full traceback: {first.path}", file=sys.stderr)
    else:
        print(
            f"mplaunch: the workers exited with status {code} without an error report "
            f"(killed by the system? out of memory?); see {plan.command_line()}",
            file=sys.stderr,
        )
    print(
        f"mplaunch: checkpoints, if any, are in {run_dir.checkpoints}; running the same recipe again "
        "resumes from the latest",
        file=sys.stderr,
    )
