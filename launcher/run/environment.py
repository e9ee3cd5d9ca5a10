"""`mplaunch env`: versions and GPUs, for bug reports and for checking a machine."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """Python, torch, CUDA, NCCL, deepspeed, accelerate and transformers versions, and each GPU."""
    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"mplaunch      {_version('mplaunch')}",
    ]
    for dist in ("torch", "deepspeed", "accelerate", "transformers", "pydantic"):
        lines.append(f"{dist:<13} {_version(dist)}")
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
