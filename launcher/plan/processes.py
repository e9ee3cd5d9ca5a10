"""Where the workers run and how they are started: the device, the processes per node, their
environment and the torchrun command (the local launch's, and each Slurm node's)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from launcher.plan.hardware import Hardware
from launcher.recipe.sections import Recipe
from launcher.rundir.layout import PLAN_FILE


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
    if recipe.launch.max_restarts:
        # torchrun's shared rendezvous store keeps the previous attempt's keys, and restarted
        # workers then connect to the dead workers' addresses when they create process groups
        # beyond the default one (DeepSpeed does). A fresh store per attempt avoids that.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env
