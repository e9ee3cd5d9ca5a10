"""The machine a run starts on: `mplaunch env`'s report, and the env.json snapshot kept with each run.

Light side: torch is imported only inside `report`, which is never called on the way to a run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata

from launcher.plan import processes

# What env.json records; `mplaunch env` shows the libraries a user asks about.
SNAPSHOT_DISTS = ("mplaunch", "torch", "deepspeed", "accelerate", "transformers", "tokenizers", "pydantic")
REPORT_DISTS = ("torch", "deepspeed", "accelerate", "transformers", "pydantic")


def _version(dist: str) -> str | None:
    """The installed version of `dist`, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def report() -> str:
    """Python, torch, CUDA, NCCL, deepspeed, accelerate and transformers versions, and each GPU."""
    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"mplaunch      {_version('mplaunch') or 'not installed'}",
    ]
    for dist in REPORT_DISTS:
        lines.append(f"{dist:<13} {_version(dist) or 'not installed'}")
    lines.append(f"extensions    {_extensions()}")
    try:
        import torch
    except ImportError:
        lines.append("cuda          unknown (torch is not installed)")
        return "\n".join(lines)
    cuda = torch.version.cuda or "none (CPU build of torch)"
    lines.append(f"cuda          {cuda}")
    nccl = "n/a"
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
    lines.append(f"nccl          {nccl}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"gpus          {count}")
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        lines.append(
            f"  gpu {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {cap[0]}.{cap[1]}, "
            f"bf16 {'yes' if cap >= (8, 0) else 'no'}, tensor cores {'yes' if cap >= (7, 0) else 'no'}"
        )
    return "\n".join(lines)


def _extensions() -> str:
    """Where a DeepSpeed run's workers build its ops (launcher.plan.processes.extensions_dir)."""
    yours = os.environ.get(processes.EXTENSIONS_ENV)
    if yours:
        return f"{yours} (your {processes.EXTENSIONS_ENV}: DeepSpeed's ops are built there)"
    ours = processes.extensions_dir()
    if ours is None:
        return f"torch's default (no home directory; set {processes.EXTENSIONS_ENV})"
    return f"{ours} (this environment's own: DeepSpeed's ops are built there on a first run)"


def snapshot() -> dict[str, object]:
    """Versions, host and git commit: enough to reproduce or report a run (RUN_DIR/env.json)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "cwd": os.getcwd(),
        "argv": sys.argv,
        "git_commit": _git_commit(),
        "versions": {dist: _version(dist) for dist in SNAPSHOT_DISTS},
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
