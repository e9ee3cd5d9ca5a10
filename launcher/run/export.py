"""`mplaunch export`: the request handed to launcher.worker.export, in a process of its own.

Reading checkpoints takes torch, DeepSpeed and transformers: the worker-side module runs in a
process of its own, so the launcher stays light (tests/unit/test_import_graph.py). It prints its
own one-line errors and exits 2 for them. A package the export needs and this machine lacks
(launcher.plan.extras) is refused here first, before that process starts.

The export runs on the CPU, and its process is told so (DS_ACCELERATOR=cpu, unless the user set
it): DeepSpeed is imported there by a DeepSpeed run's consolidation and, for every run with an HF
model, by transformers' save_pretrained, whose unwrapping (accelerate's extract_model_from_parallel)
imports deepspeed whenever it is installed; left to probe for a GPU, DeepSpeed would warn
"Setting accelerator to CPU" on a machine without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launcher.errors import UserError
from launcher.plan import extras
from launcher.plan.resolve import Plan
from launcher.rundir.layout import RunDir


def export(run_dir: str, out: str, *, step: int | None, dtype: str, lora: str, force: bool) -> int:
    """Run the export of `run_dir`'s checkpoint into `out`; returns its exit code.

    Raises:
        UserError: a package the export of this run needs is not installed.
    """
    require_packages(Path(run_dir))
    request = {
        "run_dir": str(Path(run_dir).resolve()),
        "out": str(Path(out).resolve()),
        "step": step,
        "dtype": dtype,
        "force": force,
        "lora": lora,
    }
    env = {**os.environ}
    env.setdefault("DS_ACCELERATOR", "cpu")
    return subprocess.run(
        [sys.executable, "-m", "launcher.worker.export", json.dumps(request)], env=env
    ).returncode


def require_packages(run_dir: Path) -> None:
    """Refuse an export whose run needs a package this machine lacks. A run directory without a
    readable plan.json passes: the export process says what is wrong with it.

    Raises:
        UserError: one line per extra with missing packages.
    """
    try:
        plan = Plan.from_json(RunDir.of(run_dir).plan_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return
    lines = extras.export_problems(plan.recipe)
    if lines:
        raise UserError(lines)
