"""The local two-node Slurm cluster itself, and the Slurm behaviour the sbatch template relies on."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    SlurmCluster,
    slurm_cluster_fixture,  # noqa: F401  (registers slurm_cluster)
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


def wait_for(path: Path, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(
        f"{text!r} not in {path} after {timeout_s} s: {path.read_text() if path.exists() else '-'}"
    )


def test_two_node_job_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "smoke.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --output={tmp_path}/smoke-%j.out\n"
        "srun bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_JOB_NUM_NODES'\n"
    )
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait_finished(job, 60)["JobState"] == "COMPLETED"
    lines = sorted((tmp_path / f"smoke-{job}.out").read_text().split("\n"))
    assert [line for line in lines if line] == ["0 0 n1 2", "1 1 n2 2"]  # task, node id, node, nodes


# A stand-in for torchrun: it ignores SIGUSR1 and starts a worker in a session of
# its own (as torchrun starts its workers); the worker records the signals it gets.
AGENT = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)
worker.wait()
"""
WORKER = """
import os, signal, sys, time
log = open(sys.argv[1] + "-" + os.environ["SLURM_NODEID"], "a", buffering=1)
signal.signal(signal.SIGUSR1, lambda s, f: log.write("worker got USR1\\n"))
log.write("ready\\n")
time.sleep(15)
"""


def test_stop_signal_reaches_workers_and_batch_shell_as_the_template_expects(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    """`scancel --signal=USR1` (what `--signal=USR1@S` sends) reaches every process of the job
    steps, workers in their own session included, but not the batch shell; `--batch` (the `B:`
    prefix) reaches only the batch shell, which is why the template's shell passes it on."""
    (tmp_path / "agent.py").write_text(AGENT)
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "worker.log"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --output={tmp_path}/job-%j.out\n"
        "trap 'echo batch got USR1' USR1\n"
        f"srun {sys.executable} {tmp_path}/agent.py {tmp_path}/worker.py {log} &\n"
        "while ! wait; do :; done\n"
    )
    job = slurm_cluster.sbatch(script)
    for node in ("0", "1"):
        wait_for(Path(f"{log}-{node}"), "ready")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    wait_for(tmp_path / f"job-{job}.out", "batch got USR1")
    time.sleep(1)
    assert "USR1" not in Path(f"{log}-0").read_text() + Path(f"{log}-1").read_text()
    slurm_cluster.run("scancel", "--signal=USR1", job)
    for node in ("0", "1"):
        wait_for(Path(f"{log}-{node}"), "worker got USR1")
    slurm_cluster.run("scancel", job)
    assert (tmp_path / f"job-{job}.out").read_text().count("batch got USR1") == 1


def submit_tiny(
    cluster: SlurmCluster, tmp_path: Path, *overrides: str, env: dict[str, str] | None = None
) -> str:
    """`mplaunch bert_tiny --slurm --nodes 2` (1 process per node); return the job id."""
    tiny, run_dir = str(ROOT / "recipes" / "bert_tiny.yaml"), f"logging.dir={json.dumps(str(tmp_path))}"
    return cluster.mplaunch(
        tmp_path, tiny, "--slurm", "--nodes", "2", run_dir, "launch.nproc_per_node=1", *overrides, env=env
    )


def test_rendered_job_rejects_a_loopback_head_on_a_real_cluster(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Both test nodes resolve to 127.0.0.1: without the explicit opt-in the second node refuses to start."""
    env = {k: v for k, v in slurm_cluster.env.items() if k != "MPLAUNCH_SLURM_ALLOW_LOOPBACK"}
    job = submit_tiny(slurm_cluster, tmp_path, env=env)
    err = tmp_path / "bert-tiny-mlm" / "slurm" / f"slurm-{job}.err"
    try:
        wait_for(err, "on node n2 the head node n1 resolves to the loopback address 127.0.0.1")
    finally:
        slurm_cluster.run("scancel", job)
    assert "srun: error: n2: task 1: Exited with exit code 2" in err.read_text()


STUB_TORCHRUN = """#!{python}
import os, signal, sys, time
if sys.argv[1:3] in (["-m", "launcher.run.requeue"], ["-m", "launcher.run.hangwatch"]):  # the script's helpers: the real ones
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
log = open(os.environ["STUB_LOG"], "a", buffering=1)
def stop(signum, frame):
    log.write(f"node {{os.environ['SLURM_NODEID']}} got USR1\\n")
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
nnodes = next(a for a in sys.argv if a.startswith("--nnodes="))
log.write(f"node {{os.environ['SLURM_NODEID']}} ready {{' '.join(sys.argv[1:3])}} {{nnodes}}\\n")
time.sleep(60)
"""


def test_rendered_job_passes_a_batch_shell_signal_to_the_steps(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """With --signal=B:USR1@S (a user's extra line or template) only the batch shell hears the warning;
    the rendered script passes it on, so torchrun (here a stub) still gets it on every node."""
    stub, log = tmp_path / "torchrun-stub", tmp_path / "stub.log"
    stub.write_text(STUB_TORCHRUN.format(python=sys.executable))
    stub.chmod(0o755)
    setup = json.dumps([f"MPLAUNCH_PYTHON={stub}"])  # the torchrun line then starts the stub
    job = submit_tiny(
        slurm_cluster, tmp_path, f"slurm.setup={setup}", f"slurm.env={json.dumps({'STUB_LOG': str(log)})}"
    )
    for node in ("0", "1"):
        wait_for(log, f"node {node} ready -m torch.distributed.run --nnodes=2")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    for node in ("0", "1"):
        wait_for(log, f"node {node} got USR1")
    assert slurm_cluster.wait_finished(job, 30)["JobState"] == "COMPLETED"
    assert (
        "batch shell got SIGUSR1; passing it to the job steps"
        in (tmp_path / "bert-tiny-mlm" / "slurm" / f"slurm-{job}.out").read_text()
    )
