"""A hang inside a Slurm job, on the local two-node cluster: the nodes' watchers (launcher.run.hangwatch)
say it in the local launcher's one line, leave every stuck rank's stacks in the run directory, stop
the workers on both nodes long before a collective would time out, and the job is not requeued.

The fault is the local hang tests' (tests/e2e/test_run_guard.py): tests/hang_model.py through
`model.target`, rank 1 stuck in its forward at step 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.rundir.watchdog import collective_timeout_s
from tests.runs import FAST_USER_MODEL, TESTS, explain, mplaunch, records, write_recipe
from tests.slurm_cluster import (
    SlurmCluster,
    slurm_cluster_fixture,  # noqa: F401  (registers slurm_cluster)
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HANG_TIMEOUT_S = 15


def test_a_hung_rank_in_a_slurm_job_is_named_with_its_stacks_and_the_job_ends(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    faulty = {
        "model": {
            "name": None,
            "target": "hang_model:build",
            "kwargs": {"vocab_size": 512, "rank": 1, "step": 3, "accum": 2, "fault": "hang"},
        },
        "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        "launch": {"hang_timeout": HANG_TIMEOUT_S, "nproc_per_node": 1},  # 2 ranks, 1 per node
        "slurm": {"env": {"PYTHONPATH": str(TESTS)}},  # where the workers find hang_model
    }
    recipe = write_recipe(tmp_path, "hang", FAST_USER_MODEL, faulty)
    submit_env = {**slurm_cluster.env, "PYTHONPATH": str(TESTS)}
    job = slurm_cluster.mplaunch(
        tmp_path, str(recipe), "--slurm", "--nodes", "2", "--time", "00:10:00", env=submit_env
    )
    run_dir = tmp_path / "runs" / "hang"
    info = slurm_cluster.wait_finished(job, 300)
    out, err = ((run_dir / "slurm" / f"slurm-{job}.{s}").read_text() for s in ("out", "err"))
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), f"{info}\n{out}\n{err}"

    verdicts = [line for line in err.splitlines() if "the run hung" in line]
    assert len(verdicts) == 1, err
    verdict = verdicts[0]
    assert verdict.startswith(
        f"mplaunch: the run hung: no rank completed a step for {HANG_TIMEOUT_S}s "
        f"(launch.hang_timeout={HANG_TIMEOUT_S}): rank 0 in step 3 for "
    ), verdict
    assert "rank 1 in step 3 for" in verdict, verdict
    assert "hang_model.py" in verdict, verdict
    stacks = f"; stacks in {run_dir / 'logs' / 'rank-0.stack'}, {run_dir / 'logs' / 'rank-1.stack'}"
    assert verdict.endswith(f"{stacks}; stopped the workers"), verdict  # both nodes' ranks
    assert "in forward" in (run_dir / "logs" / "rank-1.stack").read_text()
    assert (run_dir / "logs" / "rank-0.stack").read_text().strip()
    assert f"job {job} is not requeued: its workers hung" in out
    assert not (run_dir / "slurm" / "requeues.json").exists()

    errors = [e for e in records(run_dir, "event") if e["event"] == "error"]
    assert [e["message"] for e in errors] == [verdict.removeprefix("mplaunch: ")]
    last_step = max(r["time"] for r in records(run_dir, "train"))
    assert errors[0]["time"] - last_step < collective_timeout_s(HANG_TIMEOUT_S), (
        "the workers were stopped no sooner than a collective times out"
    )
    report = mplaunch("report", str(run_dir), "--out", str(tmp_path / "plots"))
    assert report.returncode == 0, explain(report)
    assert "crashed (at step 2: the run hung" in report.stdout
