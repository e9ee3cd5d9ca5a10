"""`mplaunch export`: the request handed to launcher.worker.export, in a process of its own.

Reading checkpoints takes torch, DeepSpeed and transformers: the worker-side module runs in a
process of its own, so the launcher stays light (tests/unit/test_import_graph.py). It prints its
own one-line errors and exits 2 for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def export(run_dir: str, out: str, *, step: int | None, dtype: str, lora: str, force: bool) -> int:
    """Run the export of `run_dir`'s checkpoint into `out`; returns its exit code."""
    request = {
        "run_dir": str(Path(run_dir).resolve()),
        "out": str(Path(out).resolve()),
        "step": step,
        "dtype": dtype,
        "force": force,
        "lora": lora,
    }
    return subprocess.run([sys.executable, "-m", "launcher.worker.export", json.dumps(request)]).returncode
