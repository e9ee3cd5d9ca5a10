"""Runs that share a checkpoint.dir: each keeps its checkpoints in its own folder, never resumes from
another run's and never prunes them; checkpoints an older mplaunch wrote straight into the shared
folder still resume, and move into their run's folder.

Real 2-rank runs of the tiny recipe through `mplaunch`; the folder rules alone are tested in
tests/unit/test_checkpoint.py, the launcher's refusals in tests/unit/test_checkpoint_refusals.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launcher.rundir import checkpoint
from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe

STEPS = 4
SHARE = {"train": {"max_steps": STEPS}, "checkpoint": {"every_steps": 2, "keep": 1}}


def _starts(run_dir: Path) -> list[int]:
    return [r["from_step"] for r in records(run_dir, "event") if r["event"] in ("start", "resume")]


def _fingerprint(step_dir: Path) -> dict[str, object]:
    return {str(p.relative_to(step_dir)): p.stat().st_mtime_ns for p in step_dir.rglob("*")} | {
        "manifest": (step_dir / "manifest.json").read_text()
    }


@pytest.mark.slow
def test_two_runs_sharing_a_checkpoint_dir_never_touch_each_others_checkpoints(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    layer = {**SHARE, "checkpoint": {**SHARE["checkpoint"], "dir": str(shared)}}
    result = mplaunch(str(write_recipe(tmp_path, "a", FAST, layer)))
    assert result.returncode == 0, explain(result)
    a_step = shared / "a" / "step-00000004"
    manifest = checkpoint.read_manifest(a_step)
    assert manifest["run"] == {"name": "a", "dir": str(tmp_path / "runs" / "a")}
    before = _fingerprint(a_step)

    result = mplaunch(str(write_recipe(tmp_path, "b", FAST, layer)))  # keep=1: b prunes its own only
    assert result.returncode == 0, explain(result)
    assert "resuming from" not in result.stdout, explain(result)
    assert _starts(tmp_path / "runs" / "b") == [0]  # trained from scratch, not from a's step 4
    assert _fingerprint(a_step) == before
    assert sorted(p.name for p in shared.iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (shared / "b").iterdir()) == ["latest", "step-00000004"]
    # Both started from the same seed on the same data: the same losses, each from its own step 0.
    assert losses(tmp_path / "runs" / "b") == losses(tmp_path / "runs" / "a")


@pytest.mark.slow
def test_checkpoints_an_older_mplaunch_wrote_into_a_shared_dir_resume_and_move(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    layer = {**SHARE, "checkpoint": {**SHARE["checkpoint"], "dir": str(shared)}}
    recipe = write_recipe(tmp_path, "old", FAST, layer)
    result = mplaunch(str(recipe), "train.max_steps=2")
    assert result.returncode == 0, explain(result)
    # Rewrite it as mplaunch wrote it before per-run folders: straight into checkpoint.dir, the run
    # named only by the recipe in the manifest; beside it a checkpoint of another run, same step.
    for path in (shared / "old").iterdir():
        path.rename(shared / path.name)
    (shared / "old").rmdir()
    manifest = checkpoint.read_manifest(shared / "step-00000002")
    del manifest["run"]
    (shared / "step-00000002" / "manifest.json").write_text(json.dumps(manifest))
    other = shared / "elsewhere" / "step-00000002"
    shutil.copytree(shared / "step-00000002", other)
    manifest["recipe"]["name"], manifest["step"] = "other", 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    other.rename(shared / "step-00000001")  # a step number of its own, as another run's would be
    (shared / "elsewhere").rmdir()

    result = mplaunch(str(recipe))  # train.max_steps back to 4: trains on from step 2
    assert result.returncode == 0, explain(result)
    moved = [line for line in result.stderr.splitlines() if "keeps one folder per run now" in line]
    assert len(moved) == 1, explain(result)
    assert f"moved this run's step-00000002 (written by an older mplaunch) into {shared / 'old'}" in moved[0]
    assert "resuming from step 2" in result.stdout, explain(result)
    assert _starts(tmp_path / "runs" / "old") == [0, 2]
    assert sorted(p.name for p in (shared / "old").iterdir()) == ["latest", "step-00000004"]  # keep=1
    # The other run's checkpoint and the old pointer stay where they were, untouched.
    assert sorted(p.name for p in shared.iterdir()) == ["latest", "old", "step-00000001"]
    assert checkpoint.read_manifest(shared / "step-00000001")["recipe"]["name"] == "other"
