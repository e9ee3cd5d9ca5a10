"""A package of an extra missing, for real: the launcher refuses before any worker starts, and a
process that dies importing one (a rank, the export) says which in one line, never a traceback.

A package is hidden from the launcher by a finder put first on sys.meta_path (find_spec and import
both fail, as with the package not installed); from a worker by a package of the same name first
on PYTHONPATH whose import raises ModuleNotFoundError, so the launcher (which only looks) passes and
the rank's own import fails. The table of what needs which package is tests/unit/test_extras.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.plan import extras
from tests.runs import FAST, ROOT, TESTS, explain, mplaunch, write_recipe

TRAIN = extras.install_command("train")
# `python -c HIDE MODULES ARGV...`: the CLI with MODULES (comma-separated) not installed.
HIDE = """
import sys
hidden = set(sys.argv[1].split(","))

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from launcher.cli import main
sys.exit(main(sys.argv[2:]))
"""
SYNTHETIC = {"data": {"kind": "synthetic", "paths": [], "num_samples": 256}, "train": {"max_steps": 2}}


def _without(modules: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HIDE, modules, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def _broken(tmp_path: Path, module: str) -> Path:
    """A folder for the front of PYTHONPATH whose `module` fails to import as a missing package does."""
    package = tmp_path / "broken" / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {module!r}'!r}, name={module!r})\n"
    )
    return package.parent


def test_check_and_a_launch_without_the_train_extra_stop_before_any_worker(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "bare", FAST)
    line = (
        "error: missing packages of the train extra: transformers (model.name bert-mlm), "
        f"tokenizers (data.kind text); install them with: {TRAIN}"
    )
    checked = _without("tokenizers,transformers", "check", str(recipe))
    assert (checked.returncode, checked.stdout, checked.stderr.splitlines()) == (2, "", [line]), explain(
        checked
    )
    launched = _without("tokenizers,transformers", str(recipe))
    assert (launched.returncode, launched.stderr.splitlines()) == (2, [line]), explain(launched)
    assert not (tmp_path / "runs").exists()  # nothing written, no tokenizer trained, no worker started


def test_a_rank_that_cannot_import_a_package_names_it(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "no-numpy", FAST, SYNTHETIC)
    broken = _broken(tmp_path, "numpy")
    done = mplaunch(str(recipe), env={"PYTHONPATH": f"{broken}{os.pathsep}{TESTS}"})
    line = f"missing package of the train extra: numpy; install it with: {TRAIN}"
    assert done.returncode == 1, explain(done)
    # Both ranks die in their imports; the launcher names the one torchrun reports first.
    named = [r for r in (0, 1) if f"mplaunch: the run failed on rank-{r}: {line}" in done.stderr.splitlines()]
    assert len(named) == 1, explain(done)
    assert "without an error report" not in done.stderr
    assert "Traceback" not in done.stderr
    report = (tmp_path / "runs" / "no-numpy" / "logs" / f"rank-{named[0]}.err").read_text()
    assert report.startswith(f"{line}\n\nTraceback")
    assert "import numpy" in report


def test_an_export_process_that_cannot_import_a_package_names_it(tmp_path: Path) -> None:
    broken = _broken(tmp_path, "numpy")
    request = {"run_dir": str(tmp_path / "run"), "out": str(tmp_path / "out"), "step": None}
    done = subprocess.run(
        [sys.executable, "-m", "launcher.worker.export", json.dumps(request)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(broken)},
        timeout=300,
    )
    assert done.returncode == 2, explain(done)
    assert (
        f"error: missing package of the train extra: numpy; install it with: {TRAIN}"
        in done.stderr.splitlines()
    )
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not extras.installed("deepspeed"), reason="the warning is DeepSpeed's")
def test_exporting_an_accelerate_run_prints_no_deepspeed_warning(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "acc", FAST, {"backend": "accelerate", "train": {"max_steps": 1}})
    trained = mplaunch(str(recipe))
    assert trained.returncode == 0, explain(trained)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "export",
            str(tmp_path / "runs" / "acc"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert exported.returncode == 0, explain(exported)
    assert exported.stdout.startswith("exported step 1 of "), explain(exported)  # DeepSpeed logs to stdout
    assert "Setting accelerator" not in exported.stdout + exported.stderr, explain(exported)
    assert (tmp_path / "out" / "model.safetensors").is_file()
