"""An Accelerate fp16 run continued from a checkpoint equals an uninterrupted run bit for bit: the
loss scaler's state (launcher.worker.precision.Precision, saved in mplaunch_accelerate.json) is
restored exactly, mid growth window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoint_state import assert_bitwise_equal, final_checkpoint
from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

# The scale doubles every 2 clean steps, so a resume after step 3 lands inside a growth window.
FP16 = {
    "backend": "accelerate",
    "precision": {"dtype": "fp16", "loss_scale": {"initial": 2.0**10, "window": 2}},
    "scheduler": {"name": "constant"},  # the run's length must not change the LR
    "checkpoint": {"every_steps": 3, "keep": 2},
}


def test_accelerate_fp16_resume_restores_the_loss_scaler(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "resumed", FAST, FP16, {"train": {"max_steps": 3}})
    first = mplaunch(str(recipe))
    assert first.returncode == 0, explain(first)
    resumed = mplaunch(str(recipe), "train.max_steps=6")
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from step 3" in resumed.stdout

    straight = mplaunch(str(write_recipe(tmp_path, "straight", FAST, FP16, {"train": {"max_steps": 6}})))
    assert straight.returncode == 0, explain(straight)
    run_dir, straight_dir = tmp_path / "runs" / "resumed", tmp_path / "runs" / "straight"
    assert_bitwise_equal(final_checkpoint(run_dir, 6), final_checkpoint(straight_dir, 6))
    extra = "mplaunch_accelerate.json"
    assert json.loads((final_checkpoint(run_dir, 6) / extra).read_text()) == json.loads(
        (final_checkpoint(straight_dir, 6) / extra).read_text()
    )
    scales = {r["step"]: r["loss_scale"] for r in records(run_dir, "train")}
    assert scales == {r["step"]: r["loss_scale"] for r in records(straight_dir, "train")}
    assert scales[6] > scales[1]  # the scale grew, across the resume
    assert losses(run_dir) == losses(straight_dir)
