"""`mplaunch sweep` with real runs: a 2x2 grid here, a failing point that does not stop the others, a
rerun that finishes only the unfinished points, and a sweep killed mid-point that resumes from its checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.run.launch import child_pids
from launcher.rundir.layout import RunDir
from launcher.rundir.lock import RunLock
from tests.runs import ROOT, TESTS, explain, faulty_recipe, mplaunch, records

pytestmark = pytest.mark.slow

GRID = ["optimizer.lr=1e-3,2e-3", "train.seed=1,2"]
NAMES = ["lr-1e-3_seed-1", "lr-1e-3_seed-2", "lr-2e-3_seed-1", "lr-2e-3_seed-2"]


def _mlp(tmp_path: Path) -> Path:
    """The fastest run there is: the tiny MLP, one process, 2 steps."""
    path = tmp_path / "mlp.yaml"
    body = {
        "name": "mlp",
        "model": {"name": "tiny-mlp"},
        "backend": "accelerate",
        "launch": {"nproc_per_node": 1, "device": "cpu"},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2, "eval_every": 0},
        "precision": {"dtype": "fp32"},
        "logging": {"dir": str(tmp_path / "runs"), "every_steps": 1, "tensorboard": False, "progress": False},
        "checkpoint": {"every_steps": 0},
    }
    path.write_text(yaml.safe_dump(body))
    return path


def _state(run_dir: Path) -> tuple[int, bytes]:
    metrics = run_dir / "metrics.jsonl"
    return metrics.stat().st_mtime_ns, metrics.read_bytes()


def test_a_grid_sweep_a_failing_point_and_a_rerun(tmp_path: Path) -> None:
    recipe = _mlp(tmp_path)
    sweep_dir = tmp_path / "runs" / "mlp-sweep"

    dry = mplaunch("sweep", str(recipe), *GRID, "--dry-run")
    assert dry.returncode == 0, explain(dry)
    for index, name in enumerate(NAMES):
        assert re.search(rf"^\s+{index}\s+{name}\s", dry.stdout, re.MULTILINE), dry.stdout
        assert f"{sweep_dir / name}: new" in dry.stdout
    assert not sweep_dir.exists()

    # A point that passes every check and fails in its run: another process holds its directory.
    blocked = sweep_dir / NAMES[2]
    blocked.mkdir(parents=True)
    with RunLock.acquire(RunDir.of(blocked).lock):
        first = mplaunch("sweep", str(recipe), *GRID)
    assert first.returncode == 1, explain(first)
    assert re.search(rf"2\s+{NAMES[2]}\s+failed: exit 2", first.stdout), explain(first)
    done = [n for n in NAMES if n != NAMES[2]]
    for name in done:
        assert re.search(rf"\d\s+{name}\s+finished", first.stdout), explain(first)
        saved = yaml.safe_load((sweep_dir / name / "recipe.yaml").read_text())
        lr, seed = re.fullmatch(r"lr-(.+)_seed-(\d)", name).groups()  # type: ignore[union-attr]
        assert (saved["optimizer"]["lr"], saved["train"]["seed"], saved["name"]) == (
            float(lr),
            int(seed),
            name,
        )
        assert (sweep_dir / name / "FINISHED").is_file()
    assert not (blocked / "FINISHED").exists()
    before = {name: _state(sweep_dir / name) for name in done}

    rerun = mplaunch("sweep", str(recipe), *GRID)
    assert rerun.returncode == 0, explain(rerun)
    assert rerun.stdout.count("already finished, skipped") == 3, explain(rerun)
    assert re.search(rf"2\s+{NAMES[2]}\s+finished", rerun.stdout), explain(rerun)
    assert (blocked / "FINISHED").is_file()
    assert {name: _state(sweep_dir / name) for name in done} == before  # the finished runs were not touched
    assert f"mplaunch compare {sweep_dir}" in rerun.stdout


def _tree(pid: int) -> list[int]:
    return [pid, *(p for child in child_pids(pid) for p in _tree(child))]


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def test_a_sweep_killed_mid_point_reruns_only_that_point_from_its_checkpoint(tmp_path: Path) -> None:
    # Point step-4 hangs in its step 4 (after the checkpoint of step 3): the kill meets it there however
    # slow the machine. Resumed, the model counts its steps from 1 again and finishes steps 4 and 5.
    recipe = faulty_recipe(
        tmp_path,
        "hang",
        "hang",
        0,
        100,
        {
            "launch": {"nproc_per_node": 1},
            "train": {"global_batch_size": 8, "max_steps": 5},
            "checkpoint": {"every_steps": 1},
        },
    )
    sweep_dir = tmp_path / "runs" / "hang-sweep"
    args = [sys.executable, "-m", "launcher", "sweep", str(recipe), "model.kwargs.step=100,4"]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        hung = RunDir.of(sweep_dir / "step-4")
        deadline = time.monotonic() + 600
        while 3 not in (hung.checkpoint_steps() if hung.path.is_dir() else []):
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()
            assert time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.2)
        first = _tree(proc.pid)
        _signal_all(first, signal.SIGSTOP)  # nothing moves on while the tree is collected
        everything = sorted({*first, *(p for pid in first for p in _tree(pid))})
        _signal_all(everything, signal.SIGKILL)
        proc.wait(timeout=60)
    assert (sweep_dir / "step-100" / "FINISHED").is_file()
    assert not (hung.path / "FINISHED").exists()
    before = _state(sweep_dir / "step-100")

    rerun = mplaunch("sweep", str(recipe), "model.kwargs.step=100,4")
    assert rerun.returncode == 0, explain(rerun)
    assert "point 1 of 2, step-100: already finished, skipped" in rerun.stdout, explain(rerun)
    assert "resuming from step 3" in rerun.stdout + rerun.stderr, explain(rerun)
    assert (hung.path / "FINISHED").is_file()
    assert _state(sweep_dir / "step-100") == before
    assert max(r["step"] for r in records(hung.path, "train")) == 5


def test_a_sweeps_runs_land_in_one_mlflow_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With logging.trackers mlflow, every point logs to SWEEP_DIR/mlruns, experiment = the sweep's name."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 opens a file store only on request
    recipe = _mlp(tmp_path)
    sweep_dir = tmp_path / "runs" / "mlp-sweep"
    done = mplaunch("sweep", str(recipe), "optimizer.lr=1e-3,2e-3", "logging.trackers=[mlflow]")
    assert done.returncode == 0, explain(done)
    client = MlflowClient(tracking_uri=(sweep_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("mlp-sweep")
    assert experiment is not None
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["lr-1e-3", "lr-2e-3"]
    for name, run_id in runs.items():
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
        wanted = [(r["step"], r["loss"]) for r in records(sweep_dir / name, "train")]
        assert len(wanted) == 2
        assert sorted(logged) == wanted
