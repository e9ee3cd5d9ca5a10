"""`mplaunch RECIPE --slurm --nodes 2` on the local two-node cluster: train, and survive a preemption."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.runs import TINY, records
from tests.slurm_cluster import (
    SlurmCluster,
    slurm_cluster_fixture,  # noqa: F401  (registers slurm_cluster)
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit(cluster: SlurmCluster, tmp_path: Path, *overrides: str) -> tuple[str, Path]:
    """Submit bert_tiny on 2 nodes x 1 CPU process (gloo); return the job id and the run dir."""
    job = cluster.mplaunch(
        tmp_path, str(TINY), "--slurm", "--nodes", "2", "--time", "00:10:00",
        f"logging.dir={json.dumps(str(tmp_path))}", "launch.nproc_per_node=1", "checkpoint.every_steps=10",
        "logging.every_steps=5", "train.eval_every=0", "data.seq_len=32", "train.micro_batch_size=4",
        "train.global_batch_size=16", "logging.tensorboard=false", *overrides,
    )  # fmt: skip
    return job, tmp_path / "bert-tiny-mlm"


def job_log(run_dir: Path, job: str) -> str:
    return "\n".join((run_dir / "slurm" / f"slurm-{job}.{s}").read_text() for s in ("out", "err"))


def wait_completed(cluster: SlurmCluster, job: str, run_dir: Path, timeout_s: float) -> dict[str, str]:
    info = cluster.wait_finished(job, timeout_s)
    assert info["JobState"] == "COMPLETED", f"{info}\n{job_log(run_dir, job)[-4000:]}"
    return info


def test_tiny_bert_trains_across_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job, run_dir = submit(slurm_cluster, tmp_path, "train.max_steps=20")
    wait_completed(slurm_cluster, job, run_dir, 180)
    assert json.loads((run_dir / "FINISHED").read_text())["step"] == 20
    log = job_log(run_dir, job)
    assert "node 0 (n1, task 0)" in log
    assert "node 1 (n2, task 1)" in log
    assert "run complete" in log
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert (plan["nnodes"], plan["nproc_per_node"], plan["dist_backend"]) == (2, 1, "gloo")
    recs = records(run_dir)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 5, 10, 15, 20]
    assert [r["event"] for r in recs if r["kind"] == "event" and r["event"] in ("start", "finish")] == [
        "start",
        "finish",
    ]


def wait_for_train_step(run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(run_dir, "train")):
            return
        time.sleep(0.5)
    raise AssertionError(f"no train record at step {step} after {timeout_s} s")


def assert_one_continuous_run(recs: list[dict[str, Any]], max_steps: int, every: int) -> None:
    """Steps never go back past the last checkpoint; the latest record per step covers the whole run."""
    last_ckpt, highest = 0, 0
    for r in recs:
        assert r["step"] >= min(highest, last_ckpt), f"step went back past checkpoint {last_ckpt}: {r}"
        highest = max(highest, r["step"])
        if r["kind"] == "event" and r["event"] == "checkpoint":
            last_ckpt = r["step"]
    latest = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert sorted(latest) == [1, *range(every, max_steps + 1, every)]  # the run's first step is logged too
    assert all(latest[s]["loss"] == latest[s]["loss"] for s in latest)  # finite, not NaN


@pytest.mark.parametrize("how", ["warning-signal", "scontrol-requeue"])
def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
    how: str,
) -> None:
    job, run_dir = submit(slurm_cluster, tmp_path, "train.max_steps=40")
    wait_for_train_step(run_dir, 10, 150)
    if how == "warning-signal":
        slurm_cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@S sends at the time limit
    else:
        slurm_cluster.run("scontrol", "requeue", job)  # Slurm requeues it: SIGTERM, KillWait, SIGKILL
    info = wait_completed(slurm_cluster, job, run_dir, 240)
    assert info["Restarts"] == "1"
    recs = records(run_dir)
    events = [r for r in recs if r["kind"] == "event"]
    stops = [e for e in events if e["event"] == "stop"]
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(stops) == 1, events
    assert len(resumes) == 1, events
    stopped_at = stops[0]["step"]
    assert 10 <= stopped_at < 40
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert stopped_at in saved  # the stop wrote a checkpoint at the step it stopped
    assert resumes[0]["from_step"] == stopped_at  # and the requeued job went on from exactly there
    assert [e["event"] for e in events].count("finish") == 1
    assert_one_continuous_run(recs, 40, 5)
    log = job_log(run_dir, job)
    assert "(restart 1)" in log
    assert "run complete" in log
    if how == "warning-signal":  # mplaunch requeued it (after_stop), and counted that
        assert f"requeueing job {job} (1 of 3)" in log
        assert json.loads((run_dir / "slurm" / "requeues.json").read_text()) == {job: 1}
    else:  # Slurm requeued it; after_stop left it alone
        assert "Slurm ends or requeues it, so mplaunch does not" in log
        assert not (run_dir / "slurm" / "requeues.json").exists()
