"""Plans of the tiny MLP on GPUs that are described, not present: for the precision health tests
of the unit tier and the x-ray tests of the worker tier."""

from __future__ import annotations

from typing import Any

from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate

GiB = 2**30
A100 = Hardware(gpus=(Gpu(0, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB),), cpu_count=16)
V100 = Hardware(gpus=(Gpu(0, "Tesla V100-SXM2-32GB", (7, 0), 32 * GiB),), cpu_count=16)


def make_plan(
    dtype: str = "fp16", hardware: Hardware = A100, backend: str = "accelerate", **loss_scale: Any
) -> Plan:
    """The tiny MLP on `hardware` with one process, in `dtype`, its loss scale set by `loss_scale`."""
    raw = {
        "name": "t",
        "model": {"name": "tiny-mlp"},
        "train": {"micro_batch_size": 4},
        "precision": {"dtype": dtype, "loss_scale": loss_scale},
        "launch": {"device": "cuda" if hardware.gpus else "cpu", "nproc_per_node": 1},
        "backend": backend,
    }
    return resolve(validate(raw, "test"), hardware)
