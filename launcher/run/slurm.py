"""Slurm: a plan -> an sbatch script (Jinja2 template), submitted with sbatch; the requeue contract.

One srun task per node runs torchrun with c10d rendezvous on the first node of
the allocation. The plan is resolved for the cluster's nodes (GPUs from
slurm.gpus_per_node), not for the submitting machine, and written to
RUN_DIR/plan.json; the job runs exactly that plan, so a run is reproducible
from its directory (`sbatch RUN_DIR/slurm/job.sbatch` resubmits it).

Stop protocol (the worker side lives in launcher.worker.train): the job asks for
SIGUSR1 slurm.signal_s seconds before its time limit. Without the `B:` prefix
Slurm signals every process of the job steps (torchrun and, through the
process tracker, the workers too); torchrun is told to handle SIGUSR1 as well,
so it forwards it to the workers (needed where the tracker only reaches the
task) and waits up to signal_s seconds for them before SIGKILL. The workers
checkpoint at the next step boundary, record a "stop" event and exit; once
srun returns, the script runs `python -m launcher.run.requeue`, which requeues the
job (launcher.run.requeue). A requeued job starts its script again and the workers
resume from the latest checkpoint; RUN_DIR/FINISHED ends it at once.

One run per directory (launcher.rundir.lock): the batch script holds RUN_DIR/.lock with
`flock` for the job's life and names the job in it; submission is refused while a
local run or a queued or running job holds it.

Before submitting, `sbatch --test-only` asks whether the job could ever start; one that no
node of its partition can hold is refused in one line (launcher.run.slurm_feasible). The
slurm.* values are checked in launcher.run.slurm_checks.

Light side: no torch import.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.errors import UserError
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.processes import torchrun_command
from launcher.plan.resolve import Plan, prepare_vocab, resolve
from launcher.recipe import schema as recipe_mod
from launcher.run import preflight, slurm_checks, slurm_feasible
from launcher.rundir.layout import RunDir
from launcher.rundir.lock import Holder, RunLock

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "sbatch.sh.j2"
STOP_SIGNAL = "USR1"
# How long srun lets the other nodes finish after the first task exits; a crashed
# node takes the job down after this, a clean stop is done long before.
SRUN_WAIT_S = 60
# How long a starting job waits for RUN_DIR/.lock: the submitter holds it until sbatch has
# answered; a live local run or job keeps it longer, and the job then fails with its name.
LOCK_WAIT_S = 60
# GPUs on the cluster are not visible from the login node; precision "auto"
# assumes they are Ampere or newer (bf16). Set precision.dtype to be explicit.
CLUSTER_GPU = Gpu(index=0, name="GPU on the Slurm nodes", capability=(8, 0), memory_bytes=80 * 2**30)
# Each node's torchrun meets the others on the allocation's first node. These are
# shell words of the per-task script, expanded there (see the template).
RENDEZVOUS = (
    "--rdzv-backend=c10d",
    "--rdzv-endpoint=$MPLAUNCH_HEAD:$MPLAUNCH_PORT",
    "--rdzv-id=$SLURM_JOB_ID",
    "--rdzv-conf=is_host=$is_host",
)
SAFE_WORD = re.compile(r"[A-Za-z0-9_.,:=/@%+-]+")


def run(recipe: recipe_mod.Recipe, template: Path | None = None, dry_run: bool = False) -> int:
    """`mplaunch RECIPE --slurm`: resolve for the cluster, render, write the run dir, submit (or print)."""
    if not dry_run:  # the submitted plan knows the trained tokenizer's exact vocabulary
        prepare_vocab(recipe)
    plan = resolve_for_cluster(recipe)
    script = render(plan, template or DEFAULT_TEMPLATE)
    preflight.print_warnings(plan.warnings)
    if dry_run:
        print(script, end="")
        return 0
    return submit(plan, script)


def cluster_hardware(recipe: recipe_mod.Recipe) -> Hardware:
    """Each node of the job: slurm.gpus_per_node GPUs (0: CPU) and slurm.cpus_per_task cores."""
    gpus = gpus_per_node(recipe)
    nproc = recipe.launch.nproc_per_node
    procs = nproc if isinstance(nproc, int) else max(1, gpus)
    cpus = recipe.slurm.cpus_per_task or procs
    gpu_list = tuple(
        Gpu(i, CLUSTER_GPU.name, CLUSTER_GPU.capability, CLUSTER_GPU.memory_bytes) for i in range(gpus)
    )
    return Hardware(gpus=gpu_list, cpu_count=cpus)


def gpus_per_node(recipe: recipe_mod.Recipe) -> int:
    """slurm.gpus_per_node, else launch.nproc_per_node for a cuda recipe, else 0 (CPU)."""
    if recipe.slurm.gpus_per_node is not None:
        return recipe.slurm.gpus_per_node
    nproc = recipe.launch.nproc_per_node
    if recipe.launch.device == "cuda":
        if isinstance(nproc, int):
            return nproc
        raise UserError(
            "slurm.gpus_per_node: launch.device is cuda but the GPUs per node are unknown",
            hint="set slurm.gpus_per_node (--gpus-per-node) or launch.nproc_per_node",
        )
    return 0


def resolve_for_cluster(recipe: recipe_mod.Recipe) -> Plan:
    """The plan for the cluster's nodes; UserError lists every problem of the recipe and its Slurm values."""
    problems = slurm_checks.check_values(recipe)
    if problems:
        raise UserError(problems)
    if recipe.launch.device == "cuda" and gpus_per_node(recipe) == 0:
        raise UserError("slurm.gpus_per_node: 0 GPUs but launch.device is cuda", hint="use --gpus-per-node N")
    return resolve(recipe, cluster_hardware(recipe), nnodes_allowed=True)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Paths:
    """Where the job's files go: RUN_DIR/slurm/ (named by launcher.rundir.layout)."""

    run_dir: Path

    @property
    def files(self) -> RunDir:
        return RunDir.of(self.run_dir)

    @property
    def slurm_dir(self) -> Path:
        return self.files.slurm_dir

    @property
    def script(self) -> Path:
        return self.files.slurm_script

    def log(self, suffix: str, job_id: str = "%j") -> Path:
        return self.files.slurm_log(suffix, job_id)


def context(plan: Plan) -> dict[str, Any]:
    """Everything a template may use; every value is checked or quoted by the template's filters."""
    recipe, s = plan.recipe, plan.recipe.slurm
    paths = Paths(Path(plan.run_dir))
    return {
        "version": __version__,
        "source": recipe.source,
        "job_name": recipe.name,
        "nodes": plan.nnodes,
        "nproc_per_node": plan.nproc_per_node,
        "gpus_per_node": gpus_per_node(recipe),
        "cpus_per_task": cluster_hardware(recipe).cpu_count,
        "mem": s.mem,
        "time": s.time,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "slurm_dir": str(paths.slurm_dir),
        # File names inside slurm_dir and run_dir, as launcher.rundir.layout names them.
        "slurm_out": paths.log("out").name,
        "slurm_err": paths.log("err").name,
        "plan_file": paths.files.plan_file.name,
        "finished_file": paths.files.finished.name,
        "lock_file": paths.files.lock.name,
        "lock_wait_s": LOCK_WAIT_S,
        "logs_dir": paths.files.logs.name,
        "metrics_file": paths.files.metrics.name,
        "signal": STOP_SIGNAL,
        "signal_s": s.signal_s,
        "extra_sbatch": list(s.extra_sbatch),
        "run_dir": plan.run_dir,
        "script": str(paths.script),
        "plan_path": str(plan.plan_path),
        "python": plan.command[0] if plan.command else sys.executable,
        "env": layered_env(plan),
        "torchrun": task_torchrun(plan),
        "setup": list(s.setup),
        "max_restarts": recipe.launch.max_restarts,
        "master_port": recipe.launch.master_port,
        "srun_wait_s": SRUN_WAIT_S,
    }


def layered_env(plan: Plan) -> dict[str, str]:
    """The plan's environment (the one a local launch gets), then slurm.env, in that order in the script."""
    top = plan.recipe.slurm.env
    below = {k: v for k, v in plan.env.items() if k not in top}
    return {**below, **top}


def task_torchrun(plan: Plan) -> list[str]:
    """The torchrun command of each node's task, as shell words of the single-quoted task script.

    It is launcher.plan.resolve's torchrun command with the rendezvous on the first node, the stop
    signal handled, and the interpreter and plan path taken from the task's environment.
    """
    handled = f"--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG{STOP_SIGNAL}"
    argv = torchrun_command(
        plan.recipe,
        plan.nproc_per_node,
        plan.run_dir,
        nnodes=plan.nnodes,
        rendezvous=RENDEZVOUS,
        python="$MPLAUNCH_PYTHON",
        plan_path="$MPLAUNCH_PLAN",
        extra=(handled, f"--shutdown-timeout={plan.recipe.slurm.signal_s}"),
    )
    return [_task_word(word) for word in argv]


def _task_word(word: str) -> str:
    # Words naming a variable are double-quoted for the task's shell (`--flag="$X:$Y"`);
    # every other word is a plain token. None may hold a quote, which would end the script.
    if "$" not in word:
        assert SAFE_WORD.fullmatch(word), word
        return word
    assert not any(ch in word for ch in "'\"`\\"), word
    flag, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
    return f'{flag}="{value}"' if eq else f'"{word}"'


def render(plan: Plan, template: Path = DEFAULT_TEMPLATE) -> str:
    """The sbatch script for `plan` from a Jinja2 template (undefined names are errors)."""
    return render_names(template, context(plan))


def render_names(template: Path, names: dict[str, Any]) -> str:
    """A Jinja2 template given `names` and this module's filters (undefined names are errors).

    Raises:
        UserError: the template cannot be read, or does not render (its line, and the names it may use).
    """
    import jinja2

    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sbatch_path"] = sbatch_path
    env.filters["oneline"] = lambda value: json.dumps(str(value))
    env.filters["qline"] = shell_line
    try:
        text = template.read_text()
    except OSError as exc:
        raise UserError(f"{template}: cannot read the Slurm template ({exc.strerror})") from None
    try:
        return env.from_string(text).render(names)
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f"{template}:{line}" if line else str(template)
        raise UserError(
            f"{where}: {exc.message or exc}", hint=f"names a template may use: {', '.join(names)}"
        ) from None


def shell_line(value: object) -> str:
    """`value` as one bash word that keeps to its line, for a command shown in a comment or a message:
    shell-quoted, or in bash's $'...' quoting when it holds a character that is not printable (a
    line break would end the comment, and a pasted line would run what follows it)."""
    text = str(value)
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_ansi_c(ch) for ch in text) + "'"


def _ansi_c(ch: str) -> str:
    if ch in "\\'":
        return "\\" + ch
    if ch.isprintable():
        return ch
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\U{ord(ch):08x}"


def sbatch_path(directory: str, pattern: str = "") -> str:
    """DIRECTORY/PATTERN for an #SBATCH line, double-quoted; `%` in the directory is escaped
    (sbatch expands %j, %x ... there), the file name pattern is kept as given."""
    if any(ch in directory for ch in '"\\') or not directory.isprintable():
        raise UserError(
            f"{directory!r}: a path Slurm cannot take on an #SBATCH line", hint="choose another logging.dir"
        )
    path = directory.replace("%", "%%") + (f"/{pattern}" if pattern else "")
    return f'"{path}"'


# --------------------------------------------------------------------------- submitting


def cluster_request(plan: Plan) -> slurm_feasible.Request:
    """What the job asks of each node, as the script's #SBATCH lines say it (one task per node)."""
    s = plan.recipe.slurm
    return slurm_feasible.Request(
        nodes=plan.nnodes,
        cpus=cluster_hardware(plan.recipe).cpu_count,
        gpus=gpus_per_node(plan.recipe),
        memory_mb=slurm_checks.mem_mb(s.mem) if s.mem else None,
        partitions=tuple(p for p in (s.partition or "").split(",") if p),
    )


def submit(plan: Plan, script: str) -> int:
    """Write the run directory and the script, submit it, print the job id and the log paths."""
    sbatch = find_sbatch()
    # Refused while a local run or a live job holds the run directory; held until sbatch has
    # answered, then left naming the queued job, which takes it when it starts.
    with RunLock.acquire(RunDir.from_plan(plan).lock) as lock:
        if preflight.finished_run(plan, "nothing submitted"):
            return 0
        preflight.check_resume(plan)
        # Before anything is written: a job no node can hold is refused, not left pending forever.
        slurm_feasible.check(sbatch, script, cluster_request(plan))
        paths = prepare_job(plan, script)
        job_id = run_sbatch(sbatch, paths.script)
        lock.release(keep=submitted(job_id))
    print(f"mplaunch: submitted job {job_id}: {plan.batch.equation(plan.nnodes, plan.nproc_per_node)}")
    print(f"mplaunch: logs {paths.log('out', job_id)} and {paths.log('err', job_id)}")
    follow = shlex.quote(str(paths.log("out", job_id)))
    print(f"mplaunch: run dir {paths.run_dir}; follow with: tail -f {follow}")
    return 0


def find_sbatch() -> str:
    """The sbatch program; UserError off a Slurm login node."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            "sbatch not found: submit from a Slurm login node", hint="--dry-run prints the script"
        )
    return sbatch


def prepare_job(plan: Plan, script: str) -> Paths:
    """Write the run directory (launcher.run.preflight) and its job script, which
    `sbatch RUN_DIR/slurm/job.sbatch` submits again; under the run's lock, once preflight passed."""
    paths = Paths(Path(preflight.prepare_run_dir(plan)))
    paths.slurm_dir.mkdir(parents=True, exist_ok=True)
    paths.script.write_text(script)
    paths.files.command_file.write_text(f"sbatch {shlex.quote(str(paths.script))}\n")
    return paths


def run_sbatch(sbatch: str, script: Path) -> str:
    """Submit `script`; its job id (a job array's id).

    Raises:
        UserError: sbatch refused it (its reason, on one line).
    """
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
        raise UserError(f"sbatch refused the job: {' / '.join(reason)}", hint=f"script kept at {script}")
    return done.stdout.strip().split(";")[0]


def submitted(job_id: str) -> Holder:
    """What a run's lock names once its job is queued: `job_id` (an array element's is ARRAY_INDEX),
    submitted from here; the job takes the lock over when it starts."""
    return dataclasses.replace(Holder.this_process(), pid=None, job_id=job_id, state="submitted")
