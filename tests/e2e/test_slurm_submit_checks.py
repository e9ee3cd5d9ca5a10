"""What `mplaunch --slurm` checks before it submits, on the local two-node cluster: a job no node
can hold is refused in one line and nothing is queued; a feasible one passes the same check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    CPUS_PER_NODE,
    NODES,
    SlurmCluster,
    slurm_cluster_fixture,  # noqa: F401  (registers slurm_cluster)
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "bert_tiny.yaml"
pytestmark = pytest.mark.slurm
NODE_NAMES = ", ".join(NODES)


def mplaunch(
    cluster: SlurmCluster, tmp_path: Path, name: str, *args: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`mplaunch bert_tiny --slurm ARGS` (1 process per node) as run `name`, with PATH `path`."""
    argv = [sys.executable, "-m", "launcher", str(TINY), "--slurm", f"name={name}",
            f"logging.dir={json.dumps(str(tmp_path))}", "launch.nproc_per_node=1", *args]  # fmt: skip
    env = {**cluster.env, "PATH": path or os.environ["PATH"]}
    return subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize(
    ("name", "args", "line"),
    [
        (
            "never-cpus",
            ("--nodes", "2", f"slurm.cpus_per_task={CPUS_PER_NODE * 32}"),
            f"no node of partition test has {CPUS_PER_NODE * 32} CPUs (the most is {CPUS_PER_NODE}: "
            f"{NODE_NAMES}) (hint: ask for at most {CPUS_PER_NODE} CPUs (slurm.cpus_per_task) or use "
            "another slurm.partition)",
        ),
        (
            "never-mem",
            ("--nodes", "1", "slurm.mem=64G"),
            f"no node of partition test has 64G of memory (the most is 2000M: {NODE_NAMES}) (hint: ask "
            "for at most 2000M of memory (slurm.mem) or use another slurm.partition)",
        ),
        (
            "never-nodes",
            ("--nodes", str(len(NODES) + 1), "train.global_batch_size=null"),
            f"only {len(NODES)} nodes of partition test ({NODE_NAMES}) have 1 CPU; the job asks for "
            f"{len(NODES) + 1} (hint: use at most --nodes {len(NODES)}, or ask for less per node)",
        ),
    ],
)
def test_a_job_no_node_can_hold_is_refused_and_nothing_is_queued(
    slurm_cluster: SlurmCluster, tmp_path: Path, name: str, args: tuple[str, ...], line: str
) -> None:
    """Without the check sbatch queues the first and the last, which then pend forever
    (PartitionConfig, PartitionNodeLimit); it refuses the memory with a reason naming no node."""
    done = mplaunch(slurm_cluster, tmp_path, name, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: the job could never start, nothing was submitted: {line}"]
    assert slurm_cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.strip() == ""
    run_dir = tmp_path / name
    assert (run_dir / ".lock").read_text() == ""  # names no job
    assert not (run_dir / "plan.json").exists()


# The job's torchrun, standing in for the real one: it records what environment the job gave it.
STUB_TORCHRUN = """#!{python}
import json, os, sys
if sys.argv[1:3] == ["-m", "launcher.run.requeue"]:  # the script's requeue helper: the real one
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
if sys.argv[1:2] == ["-m"] and sys.argv[2].startswith("launcher."):  # other helpers: not needed here
    sys.exit(0)
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"node": os.environ["SLURM_NODEID"], "mark": os.environ.get("MY_MARK"),
                           "path": os.environ["PATH"]}}) + "\\n")
"""


def test_a_feasible_job_passes_the_check_and_keeps_the_environment_with_export_all(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """--test-only accepts it, so it is submitted and runs; --export=ALL,NAME=value (allowed, unlike
    NONE) gives the job the submitting PATH, the venv's bin directory first, and the named variable."""
    stub, log = tmp_path / "torchrun-stub", tmp_path / "stub.log"
    stub.write_text(STUB_TORCHRUN.format(python=sys.executable))
    stub.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    done = mplaunch(slurm_cluster, tmp_path, "feasible", "--nodes", "2",
                    f"slurm.setup={json.dumps([f'MPLAUNCH_PYTHON={stub}'])}",
                    f"slurm.env={json.dumps({'STUB_LOG': str(log)})}",
                    "slurm.extra_sbatch=['--export=ALL,MY_MARK=kept']",
                    path=f"{venv_bin}:{os.environ['PATH']}")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sbatch --test-only" not in done.stderr  # no note: the check passed
    job = done.stdout.split("submitted job ")[1].split(":")[0]
    info = slurm_cluster.wait_finished(job, 60)
    assert info["JobState"] == "COMPLETED", info
    seen = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["node"])
    assert [(r["node"], r["mark"]) for r in seen] == [("0", "kept"), ("1", "kept")]
    assert all(r["path"].split(":")[0] == venv_bin for r in seen)
