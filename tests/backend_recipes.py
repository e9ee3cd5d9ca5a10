"""Recipes for the backend-config tests of the unit and worker tiers: every ZeRO stage, dtype and offload."""

from __future__ import annotations

import itertools
from typing import Any

from launcher.plan.hardware import Gpu, Hardware
from launcher.recipe.schema import Recipe, validate

CPU = Hardware(cpu_count=4)
H100x8 = Hardware(
    gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30) for i in range(8)), cpu_count=64
)
LOSS_SCALE = {"initial": 2.0**12, "window": 250, "hysteresis": 3, "consecutive_hysteresis": True, "min": 2.0}


def make(
    backend: str = "deepspeed", stage: int = 0, dtype: str = "bf16", offload: str = "none", **extra: Any
) -> Recipe:
    """The tiny MLP recipe with a backend, ZeRO stage, dtype and offload (none, optimizer, params, both)."""
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"name": "tiny-mlp"},
        "backend": backend,
        "train": {"micro_batch_size": 2, "global_batch_size": 64, "grad_clip": 0.5},
        "precision": {"dtype": dtype, "loss_scale": dict(LOSS_SCALE)},
        "zero": {
            "stage": stage,
            "offload_optimizer": offload in ("optimizer", "both"),
            "offload_params": offload in ("params", "both"),
        },
        **extra,
    }
    return validate(raw, "test")


MATRIX = list(
    itertools.product([0, 1, 2, 3], ["fp16", "bf16", "fp32"], ["none", "optimizer", "params", "both"])
)


def valid_offload(stage: int, offload: str) -> bool:
    """Whether DeepSpeed honours this offload at this ZeRO stage (the recipe refuses the rest)."""
    return (offload in ("none",) or stage >= 1) and (offload not in ("params", "both") or stage == 3)
