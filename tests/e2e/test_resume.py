"""Stop, kill and resume real 2-rank CPU runs; the result must equal an uninterrupted run bit for bit."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from launcher.run.launch import child_pids
from tests.checkpoint_state import assert_bitwise_equal, final_checkpoint
from tests.runs import FAST, explain, losses, mplaunch, records, start, wait_for_step, write_recipe

pytestmark = pytest.mark.slow

STEPS = 8
RESUMABLE = {
    "train": {"max_steps": STEPS},
    "checkpoint": {"every_steps": 2, "keep": 2},
    "model": {"dropout": 0.1},
}


def _recipe(tmp: Path, name: str, backend: str, stage: int, dtype: str, extra: dict | None = None) -> Path:
    return write_recipe(
        tmp,
        name,
        FAST,
        RESUMABLE,
        {"backend": backend, "zero": {"stage": stage}, "precision": {"dtype": dtype}},
        extra or {},
    )


@pytest.fixture(autouse=True)
def _deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which sets these on import.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


@pytest.mark.parametrize(
    ("backend", "stage", "dtype"),
    [
        ("deepspeed", 2, "fp32"),
        ("deepspeed", 2, "bf16"),
        ("deepspeed", 3, "fp32"),
        ("deepspeed", 3, "bf16"),
        ("accelerate", 0, "fp32"),
        ("accelerate", 0, "bf16"),
    ],
    ids=lambda v: str(v),
)
def test_stop_and_resume_equals_an_uninterrupted_run(
    tmp_path: Path, backend: str, stage: int, dtype: str
) -> None:
    # The stopped run cannot finish before the signal arrives, however loaded the machine: it is
    # set to train far longer, with a constant schedule so that its length does not change the LR.
    # It is resumed to a few steps past the stop, and compared with a run of exactly that length.
    constant = {"scheduler": {"name": "constant"}}
    recipe = _recipe(tmp_path, "stopped", backend, stage, dtype, {**constant, "train": {"max_steps": 10_000}})
    run_dir = tmp_path / "runs" / "stopped"
    proc = start(str(recipe))
    wait_for_step(run_dir, 3, proc)
    os.kill(
        proc.pid, signal.SIGTERM
    )  # as `kill` or a scheduler would: checkpoint at the next step, then exit
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = [r for r in records(run_dir, "event") if r["event"] == "stop"]
    assert len(stopped_at) == 1, (out, err)
    k = stopped_at[0]["step"]
    assert k >= 3, (out, err)
    end = k + 3

    resumed = mplaunch(str(recipe), f"train.max_steps={end}")
    assert resumed.returncode == 0, explain(resumed)
    assert f"resuming from step {k}" in resumed.stdout
    assert f"train.max_steps 10000 -> {end}" in resumed.stderr

    straight = _recipe(tmp_path, "straight", backend, stage, dtype, {**constant, "train": {"max_steps": end}})
    result = mplaunch(str(straight))
    assert result.returncode == 0, explain(result)
    assert_bitwise_equal(
        final_checkpoint(run_dir, end), final_checkpoint(tmp_path / "runs" / "straight", end)
    )
    # One continuous curve: every step's loss equals the uninterrupted run's.
    assert losses(run_dir) == losses(tmp_path / "runs" / "straight")


def _workers(launcher_pid: int) -> list[int]:
    """The launcher's torchrun's children."""
    return [w for torchrun in child_pids(launcher_pid) for w in child_pids(torchrun)]


def test_a_killed_rank_is_restarted_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    extra = {"launch": {"max_restarts": 1}}
    recipe = _recipe(tmp_path, "killed", "deepspeed", 2, "fp32", extra)
    run_dir = tmp_path / "runs" / "killed"
    proc = start(str(recipe))
    wait_for_step(run_dir, 3, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    events = [r["event"] for r in records(run_dir, "event")]
    assert events.count("resume") == 1, events
    assert events[-1] == "finish", events

    straight = mplaunch(str(_recipe(tmp_path, "straight", "deepspeed", 2, "fp32", extra)))
    assert straight.returncode == 0, explain(straight)
    assert_bitwise_equal(
        final_checkpoint(run_dir, STEPS), final_checkpoint(tmp_path / "runs" / "straight", STEPS)
    )
    assert losses(run_dir) == losses(tmp_path / "runs" / "straight")


def test_resuming_on_a_world_size_the_global_batch_cannot_split_over_is_refused_clearly(
    tmp_path: Path,
) -> None:
    recipe = _recipe(tmp_path, "resized", "deepspeed", 2, "fp32", {"train": {"max_steps": 2}})
    first = mplaunch(str(recipe))
    assert first.returncode == 0, explain(first)
    started = time.monotonic()
    run_dir = tmp_path / "runs" / "resized"
    again = mplaunch("--resume", str(run_dir), "launch.nproc_per_node=3", "train.max_steps=4")
    assert again.returncode == 2, explain(again)
    assert time.monotonic() - started < 10  # refused by the launcher, before any worker starts
    lines = again.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "error: cannot resume on 3 ranks: the checkpoint's global batch of 16 samples in micro-batches of 4 "
        "splits over world sizes 1, 2 and 4 only"
    ), lines[-1]
    assert "Traceback" not in again.stderr
    assert not (run_dir / "checkpoints" / "step-00000004").exists()


def test_resume_flag_continues_a_run_directory(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "earlier", "deepspeed", 2, "fp32", {"train": {"max_steps": 2}})
    first = mplaunch(str(recipe))
    assert first.returncode == 0, explain(first)
    run_dir = tmp_path / "runs" / "earlier"
    # From the run directory alone (its recipe.yaml), with a new step budget.
    again = mplaunch("--resume", str(run_dir), "train.max_steps=4")
    assert again.returncode == 0, explain(again)
    assert "resuming from step 2" in again.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_resume_flag_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "empty"
    run_dir.mkdir(parents=True)
    result = mplaunch("--resume", str(run_dir))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: --resume {run_dir}: not a run directory (no recipe.yaml in {run_dir})"
    )
