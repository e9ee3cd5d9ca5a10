"""Run a recipe with DeepSpeed fp16 on CPU past mplaunch's plan-time refusal: `python tests/ds_fp16_cpu.py RECIPE`.

mplaunch refuses DeepSpeed fp16 on CPU (launcher.plan.precision.problems); on CPUs where DeepSpeed's own
CPU accelerator takes fp16 it does run, which lets tests exercise the DeepSpeed fp16 code paths (the
precision x-ray's scaled gradients) without a GPU.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe import schema as recipe_mod
from launcher.run import launch


def deepspeed_takes_fp16_on_cpu() -> bool:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


if __name__ == "__main__":
    plan = resolve(
        recipe_mod.load(Path(sys.argv[1]), sys.argv[2:]), Hardware.probe(), keep_machine_problems=True
    )
    sys.exit(launch.run(dataclasses.replace(plan, problems=())))
