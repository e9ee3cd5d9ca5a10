"""A 2x2 sweep as ONE job array on the local two-node cluster (launcher.run.sweep_slurm): every point
finishes; a preempted element is requeued alone and resumes; a killed one is finished by a rerun
that submits only it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.run import sweep_slurm
from launcher.run.sweep import Point, Sweep
from tests.runs import ROOT, TINY, records
from tests.slurm_cluster import (
    SlurmCluster,
    slurm_cluster_fixture,  # noqa: F401  (registers slurm_cluster)
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
MAX_STEPS = 30
# One CPU process per point; small enough that startup dominates, long enough to stop one mid-run.
FIXED = ("launch.nproc_per_node=1", "checkpoint.every_steps=5", "logging.every_steps=5", "train.eval_every=0",
         "data.seq_len=32", "train.global_batch_size=16", "logging.tensorboard=false", "precision.dtype=fp32",
         f"train.max_steps={MAX_STEPS}", "slurm.cpus_per_task=1")  # fmt: skip
SLURM = {"slurm.time": "00:10:00", "launch.nnodes": 1}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def grid(tmp_path: Path) -> Sweep:
    points = []
    for lr in ("1e-3", "1e-4"):
        for micro in (2, 4):
            overrides = (f"optimizer.lr={lr}", f"train.micro_batch_size={micro}")
            points.append(Point(len(points), f"lr-{lr}-micro-{micro}", overrides))
    return Sweep(TINY, FIXED, tmp_path / "grid", tuple(points))


@pytest.fixture
def cluster_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """sbatch, squeue and the jobs (which get the submitter's environment) see the cluster and this code."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return slurm_cluster


def submitted_array(out: str) -> str:
    return out.split("submitted job array ")[1].split(" ")[0]


def element_log(sweep: Sweep, element: str) -> str:
    return "\n".join((sweep.dir / "slurm" / f"slurm-{element}.{s}").read_text() for s in ("out", "err"))


def wait_for_step(run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(run_dir, "train")):
            return
        time.sleep(0.3)
    raise AssertionError(f"{run_dir}: no train record at step {step} after {timeout_s} s")


def watch_array(cluster: SlurmCluster, array: str, elements: int, timeout_s: float) -> int:
    """Wait until every element has ended; the most elements seen running at once."""
    deadline, most = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        states = cluster.run("squeue", "-h", "-r", "-j", array, "-o", "%T", check=False).stdout.split()
        most = max(most, states.count("RUNNING"))
        ended = [cluster.job(f"{array}_{i}").get("JobState") in TERMINAL for i in range(elements)]
        if not states and all(ended):
            return most
        time.sleep(0.5)
    raise AssertionError(f"array {array} not done after {timeout_s} s\n{cluster.logs()}")


def test_a_sweep_runs_as_one_array_and_a_rerun_finishes_only_the_killed_point(
    cluster_env: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, sweep = cluster_env, grid(tmp_path)
    run_dirs = [sweep.run_dir(p) for p in sweep.points]
    assert (
        sweep_slurm.submit(sweep, sweep.points, values=SLURM, template=None, max_parallel=2, dry_run=False)
        == 0
    )
    out = capsys.readouterr().out
    array = submitted_array(out)
    assert f"submitted job array {array} (4 points, at most 2 at a time)" in out
    # Element 3 runs once 0 or 1 is done; its own job id is the array's, which Slurm reads as the whole
    # array: stopped with the preemption signal, it must be requeued alone. Element 2 is killed outright.
    wait_for_step(run_dirs[2], 5, 300)
    cluster.run("scancel", f"{array}_2")
    wait_for_step(run_dirs[3], 5, 300)
    assert cluster.job(f"{array}_3")["JobId"] == array
    cluster.run("scancel", "--signal=USR1", f"{array}_3")
    assert watch_array(cluster, array, 4, 400) <= 2
    jobs = {i: cluster.job(f"{array}_{i}") for i in range(4)}
    assert [jobs[i]["JobState"] for i in range(4)] == ["COMPLETED", "COMPLETED", "CANCELLED", "COMPLETED"], (
        element_log(sweep, f"{array}_3")[-3000:]
    )
    assert [jobs[i]["Restarts"] for i in range(4)] == ["0", "0", "0", "1"]  # only element 3 was requeued
    assert f"requeueing job {array}_3 (1 of 3)" in element_log(sweep, f"{array}_3")
    assert json.loads((run_dirs[3] / "slurm" / "requeues.json").read_text()) == {f"{array}_3": 1}
    stops = [r for r in records(run_dirs[3], "event") if r["event"] in ("stop", "resume")]
    assert [r["event"] for r in stops] == ["stop", "resume"]
    assert [(p / "FINISHED").exists() for p in run_dirs] == [True, True, False, True]
    for point, run_dir in zip(sweep.points, run_dirs, strict=True):
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert (saved["optimizer"]["lr"], saved["train"]["micro_batch_size"]) == (
            float(point.overrides[0].split("=")[1]),
            int(point.overrides[1].split("=")[1]),
        )
        assert (run_dir / "slurm" / f"slurm-{array}_{point.index}.out").resolve().is_file()
    # The rerun: only the unfinished point is submitted, and it resumes from its checkpoint.
    todo = [p for p, d in zip(sweep.points, run_dirs, strict=True) if not (d / "FINISHED").exists()]
    assert sweep_slurm.submit(sweep, todo, values=SLURM, template=None, max_parallel=2, dry_run=False) == 0
    again = submitted_array(capsys.readouterr().out)
    assert (sweep.dir / "slurm" / "array.sbatch").read_text().count("#SBATCH --array=2%2") == 1
    watch_array(cluster, again, 0, 300)
    assert cluster.job(f"{again}_2")["JobState"] == "COMPLETED", element_log(sweep, f"{again}_2")[-3000:]
    assert json.loads((run_dirs[2] / "FINISHED").read_text())["step"] == MAX_STEPS
    assert any(r["event"] == "resume" for r in records(run_dirs[2], "event"))
    assert cluster.run("squeue", "-h", "-j", f"{again}_0,{again}_1,{again}_3", check=False).stdout == ""


def test_the_sweep_verb_submits_one_array(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`mplaunch sweep RECIPE k=v1,v2 ... --slurm --max-parallel 2`, once the verb exists."""
    if "sweep" not in cli.VERBS:
        pytest.skip("the `mplaunch sweep` verb is not there yet")
    argv = [sys.executable, "-m", "launcher", "sweep", str(TINY), "optimizer.lr=1e-3,1e-4",
            "train.micro_batch_size=2,4", *(f for f in FIXED if not f.startswith("train.max_steps=")),
            "train.max_steps=4", f"logging.dir={tmp_path}",
            "--slurm", "--max-parallel", "2", "--time", "00:10:00", "--nodes", "1"]  # fmt: skip
    env = {**slurm_cluster.env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    array = submitted_array(done.stdout)
    assert f"submitted job array {array} (4 points, at most 2 at a time)" in done.stdout
    assert watch_array(slurm_cluster, array, 4, 400) <= 2
    finished = sorted(tmp_path.glob("*/*/FINISHED"))
    assert len(finished) == 4, done.stdout
    assert all(json.loads(f.read_text())["step"] == 4 for f in finished)
