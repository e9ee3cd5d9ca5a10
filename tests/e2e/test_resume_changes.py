"""What a recipe change does on resume, in real runs: refused before any worker starts, or applied.

The rules themselves, on plans and manifests alone, are in tests/unit/test_resume_changes.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.plan import schedule
from launcher.recipe.schema import validate
from tests.runs import FAST, ROOT, explain, mplaunch, records, write_recipe

# --------------------------------------------------------------------------- as a user runs it


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume_changes")
    recipe = write_recipe(
        tmp,
        "run",
        FAST,
        {"train": {"max_steps": 4}, "checkpoint": {"every_steps": 2}, "launch": {"nproc_per_node": 1}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    return tmp / "runs" / "run"


@pytest.mark.slow
def test_a_plain_resume_warns_about_nothing(first_run: Path) -> None:
    again = mplaunch("--resume", str(first_run))
    assert again.returncode == 0, explain(again)
    assert "already finished 4 steps" in again.stdout
    assert "warning" not in again.stderr, again.stderr
    assert "changed" not in again.stderr, again.stderr


@pytest.mark.slow
def test_a_refused_change_stops_before_anything_starts(first_run: Path) -> None:
    plan_before = (first_run / "plan.json").read_text()
    started = time.monotonic()
    again = mplaunch(
        "--resume", str(first_run), "train.max_steps=6", "precision.dtype=bf16", "data.seq_len=64"
    )
    assert again.returncode == 2, explain(again)
    assert time.monotonic() - started < 20
    line = again.stderr.strip().splitlines()[-1]
    assert "precision.dtype fp32, this run has bf16" in line and "seq_len 32, this run has 64" in line
    assert "Traceback" not in again.stderr
    assert (first_run / "plan.json").read_text() == plan_before


@pytest.mark.slow
def test_a_new_learning_rate_on_resume_is_applied(first_run: Path) -> None:
    again = mplaunch("--resume", str(first_run), "train.max_steps=6", "optimizer.lr=1e-3")
    assert again.returncode == 0, explain(again)
    assert "applied on resume: optimizer.lr 0.0001 -> 0.001, train.max_steps 4 -> 6" in again.stderr
    recipe = validate(json.loads((first_run / "plan.json").read_text())["recipe"], "plan")
    by_step = {r["step"]: r["lr"] for r in records(first_run, "train")}
    # A record's lr is the one its step used: step 5, the first after the resume, ran at the new
    # schedule after 4 applied steps (FAST: 2 warmup steps, then linear decay to step 6).
    assert recipe.optimizer.lr == 1e-3
    assert by_step[5] == pytest.approx(1e-3 * (1 - (4 - 2) / (6 - 2)), rel=1e-6)
    assert by_step[5] == pytest.approx(schedule.lr_at(recipe, 4), rel=1e-6)
    assert by_step[6] == pytest.approx(schedule.lr_at(recipe, 5), rel=1e-6)


@pytest.mark.slow
def test_the_lr_line_appears_on_a_resume_started_from_another_working_directory(tmp_path: Path) -> None:
    """A recipe naming its corpus relative to its folder, run from there, resumed from elsewhere."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "corpus.txt").write_bytes((ROOT / "recipes" / "data" / "corpus.txt").read_bytes())
    layer = {
        "data": {"kind": "text", "paths": ["data/corpus.txt"]},
        "train": {"max_steps": 4},
        "checkpoint": {"every_steps": 2},
        "launch": {"nproc_per_node": 1},
    }
    write_recipe(project, "moved", FAST, layer)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(
        [sys.executable, "-m", "launcher", "moved.yaml"], cwd=project, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, explain(first)
    again = mplaunch("--resume", str(project / "runs" / "moved"), "train.max_steps=6", "optimizer.lr=1e-3")
    assert again.returncode == 0, explain(again)
    assert "applied on resume: optimizer.lr 0.0001 -> 0.001, train.max_steps 4 -> 6" in again.stderr
    # FAST: 2 warmup steps, then linear decay; 4 steps applied.
    before, after = 1e-4 * (1 - (4 - 2) / (4 - 2)), 1e-3 * (1 - (4 - 2) / (6 - 2))
    assert (
        f"the LR schedule continues at optimizer step 4 with the new settings: lr {before:.3g} -> {after:.3g}"
        in again.stderr
    ), again.stderr
