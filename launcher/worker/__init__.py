"""The worker process that torchrun starts: the training loop, ranks, data, models, precision,
backends, checkpointer, metrics, x-ray and export. The only package that imports torch at module level.

Its two entry points, `python -m launcher.worker.train PLAN` (a rank, under torchrun) and
`python -m launcher.worker.export REQUEST`, import torch, numpy and the libraries at module level,
before their `main` can catch anything. `report_uncaught`, made the process's sys.excepthook when
this package is first imported, says what killed one there as its `main` would have: a rank prints
`mplaunch: rank N: error: LINE` and writes the traceback to RUN_DIR/logs/rank-N.err (so the launcher
names the cause, not "exited without an error report"); export prints `error: LINE` and exits 2 for
an ImportError. LINE names a missing package and the `pip install` that brings it
(launcher.plan.extras). Any other process keeps its own hook.

Where torchao is installed (the fp8 extra), transformers imports it with every model, and its import
warns on every rank: CUDA kernel libraries that do not load on this machine (fp8 training does not use
them) and torch's notice about two of its enum types. Those loggers are set to errors only here, so
rank logs show what matters to the run.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

TRAIN = "launcher.worker.train"
EXPORT = "launcher.worker.export"
EXIT_USAGE = 2  # launcher.errors.EXIT_USAGE: export's exit code for a user's error


def report_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook: one line for an error that escaped a worker entry point's `main` (its imports)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    entry = getattr(spec, "name", None)
    if not (entry == TRAIN and isinstance(exc, Exception)) and not (
        entry == EXPORT and isinstance(exc, ImportError)
    ):
        _previous_hook(kind, exc, tb)
        return
    from launcher.plan.extras import import_error_line

    line = import_error_line(exc) or " ".join(f"{kind.__name__}: {exc}".split()).rstrip(":")
    if entry == EXPORT:
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(EXIT_USAGE)
    rank = int(os.environ.get("RANK", "0"))
    print(f"mplaunch: rank {rank}: error: {line}", file=sys.stderr, flush=True)
    if len(sys.argv) > 1:  # RUN_DIR/plan.json, where the launcher reads the ranks' reports
        from launcher.rundir.layout import RunDir

        details = "".join(traceback.format_exception(kind, exc, tb))
        RunDir.of(Path(sys.argv[1]).resolve().parent).write_rank_error(rank, line, details)


_previous_hook = sys.excepthook
sys.excepthook = report_uncaught
#: Loggers set to errors only in every worker process (see the module docstring).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
for _noisy in NOISY_LOGGERS:
    logging.getLogger(_noisy).setLevel(logging.ERROR)
