"""Where the workers run and how they are started: the device, the processes per node, their
environment and the torchrun command (the local launch's, and each Slurm node's), and the
directory where they build DeepSpeed's ops (TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from launcher.plan.hardware import Hardware
from launcher.recipe.sections import Recipe
from launcher.rundir.layout import PLAN_FILE

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"  # torch's: where it builds C++ extensions (DeepSpeed's ops)
BACKEND_NAMES = {"deepspeed": "DeepSpeed", "accelerate": "Accelerate"}


def device(recipe: Recipe, hardware: Hardware, problems: list[str]) -> tuple[str, str]:
    wanted = recipe.launch.device
    if wanted == "cuda" and not hardware.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        problems.append(f"launch.device: cuda requested but no GPU is visible{why}; use launch.device=cpu")
        return "cuda", "requested"
    if wanted != "auto":
        return wanted, "set in the recipe"
    if hardware.gpus:
        return "cuda", f"auto: {len(hardware.gpus)} GPU(s) visible"
    return "cpu", "auto: no GPU visible"


def nnodes(recipe: Recipe, nnodes_allowed: bool, problems: list[str]) -> int:
    """launch.nnodes; more than one only through Slurm (`nnodes_allowed`), else a problem."""
    n = recipe.launch.nnodes
    if n > 1 and not nnodes_allowed:
        problems.append(f"launch.nnodes: {n} nodes need --slurm; a local run uses one node")
    return n


def nproc(recipe: Recipe, hardware: Hardware, device: str, problems: list[str]) -> int:
    n = recipe.launch.nproc_per_node
    if n == "auto":
        return max(1, len(hardware.gpus)) if device == "cuda" else 1
    if device == "cuda" and hardware.gpus and n > len(hardware.gpus):
        problems.append(
            f"launch.nproc_per_node: {n} processes but only {len(hardware.gpus)} GPU(s) visible; "
            "use launch.nproc_per_node=auto"
        )
    return n


def torchrun_command(
    recipe: Recipe,
    nproc: int,
    run_dir: str,
    *,
    nnodes: int = 1,
    rendezvous: Sequence[str] | None = None,
    python: str = sys.executable,
    plan_path: str | None = None,
    extra: Sequence[str] = (),
) -> tuple[str, ...]:
    """The torchrun invocation of the worker: the local launch's, and each Slurm node's.

    Args:
        recipe: for launch.max_restarts and launch.master_port.
        nproc: processes on each node.
        run_dir: the run directory; the worker reads its plan.json.
        nnodes: nodes of the job (1 for a local launch).
        rendezvous: torchrun's rendezvous flags; default the local ones (--standalone, or c10d
            on localhost:launch.master_port).
        python: the interpreter (a Slurm node's may be a shell reference such as "$MPLAUNCH_PYTHON").
        plan_path: the plan file as the worker sees it; default RUN_DIR/plan.json.
        extra: further torchrun flags, before the worker module.
    """
    if rendezvous is None:
        port = recipe.launch.master_port
        rendezvous = (
            ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}"] if port else ["--standalone"]
        )
    return (
        python,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={recipe.launch.max_restarts}",
        *extra,
        "-m",
        "launcher.worker.train",
        plan_path or str(Path(run_dir) / PLAN_FILE),
    )


def env(recipe: Recipe, device: str, nproc: int, hardware: Hardware) -> dict[str, str]:
    """mplaunch's environment for the workers: the local launch's, and the sbatch script's below slurm.env."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # torchrun would set 1 thread per worker; on CPU that starves the run.
        "OMP_NUM_THREADS": str(max(1, hardware.cpu_count // nproc)),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if recipe.backend == "deepspeed" and device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if device == "cuda":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["NCCL_DEBUG"] = "WARN"
    if recipe.backend == "deepspeed" and not os.environ.get(EXTENSIONS_ENV) and (ops_dir := extensions_dir()):
        env[EXTENSIONS_ENV] = ops_dir  # the user's own TORCH_EXTENSIONS_DIR reaches the workers as it is
    if recipe.launch.max_restarts:
        # torchrun's shared rendezvous store keeps the previous attempt's keys, and restarted
        # workers then connect to the dead workers' addresses when they create process groups
        # beyond the default one (DeepSpeed does). A fresh store per attempt avoids that.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def extensions_dir() -> str | None:
    """Where this environment's workers build DeepSpeed's ops, unless the user set TORCH_EXTENSIONS_DIR:
    ~/.cache/mplaunch/torch_extensions/py311-torch2.13.0+cpu-deepspeed0.19.8-HASH ($XDG_CACHE_HOME
    for ~/.cache), HASH of the environment's path (sys.prefix) and those versions; None without a home.

    torch's own default, ~/.cache/torch_extensions/py311_cpu, is one directory for every environment
    of the user: two environments with different torch or DeepSpeed builds then rebuild the ops in
    turn, a minute or two at each start.
    """
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no HOME and no password entry: torch's default applies
        return None
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    name = f"{python}-torch{_version('torch')}-deepspeed{_version('deepspeed')}"
    digest = hashlib.sha256(f"{os.path.realpath(sys.prefix)}\0{name}".encode()).hexdigest()[:8]
    return str(cache.absolute() / "mplaunch" / "torch_extensions" / f"{name}-{digest}")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def deepspeed_ops(recipe: Recipe, device: str) -> dict[str, str]:
    """DeepSpeed's ops the run compiles into TORCH_EXTENSIONS_DIR on its first start (unless DeepSpeed
    was installed with them prebuilt, DS_BUILD_OPS=1), each with what a user is told while it builds."""
    ops = {}
    if recipe.backend == "deepspeed" and device == "cpu":  # DeepSpeed's collectives between CPU ranks
        ops["deepspeed_shm_comm"] = "CPU communication op"
    if recipe.backend == "deepspeed" and recipe.zero.offload_optimizer:  # the offloaded optimizer's step
        ops["cpu_adam"] = "CPU Adam op"
    return ops


def backend_starting(recipe: Recipe, device: str, prebuilt: Mapping[str, bool]) -> str:
    """What a rank does while its backend starts, as the bar and rank 0's notes say it.

    "building DeepSpeed's CPU communication op (first run only, ~1-2 min)" when an op the run
    needs is neither `prebuilt` (DeepSpeed's installed_ops) nor built in TORCH_EXTENSIONS_DIR
    for this DeepSpeed; else "starting DeepSpeed" (or Accelerate).
    """
    name = BACKEND_NAMES[recipe.backend]
    ops = {op: label for op, label in deepspeed_ops(recipe, device).items() if not prebuilt.get(op)}
    root = os.environ.get(EXTENSIONS_ENV) or None
    if ops and root is None:  # torch's default directory, somewhere this side cannot tell
        return f"starting {name} (a first run builds its {' and '.join(ops.values())} first, ~1-2 min)"
    missing = [label for op, label in ops.items() if not op_built(Path(str(root)), op)]
    if missing:
        return f"building {name}'s {' and '.join(missing)} (first run only, ~1-2 min)"
    return f"starting {name}"


def op_built(root: Path, op: str) -> bool:
    """True when torch's build of DeepSpeed's `op` under `root` is done, for the DeepSpeed installed
    here: its build.ninja names this DeepSpeed's sources (another environment's build in a directory
    they share is rebuilt)."""
    spec = importlib.util.find_spec("deepspeed")  # a top-level spec: nothing is imported
    where = spec.submodule_search_locations if spec is not None else None
    if not where or not (root / op / f"{op}.so").is_file():
        return False
    try:
        return os.path.abspath(next(iter(where))) in (root / op / "build.ninja").read_text()
    except OSError:
        return False
