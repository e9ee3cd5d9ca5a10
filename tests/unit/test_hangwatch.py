"""Each Slurm node's hang watch (launcher.run.hangwatch) without Slurm: "nodes" are shells that start
the watcher and exec a stand-in torchrun, sharing one run directory, as the sbatch template's task does.

The stand-in starts one worker (RANK in its environment, in a session of its own, as torchrun
starts them) that beats heartbeats the way launcher.worker.train does and dumps its stacks on
SIGUSR2. The live two-node job is tests/e2e/test_slurm_hang.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate
from launcher.run import requeue
from launcher.run.hangwatch import Decision, child_pids, decision_file, hang_since
from launcher.rundir.layout import RunDir
from launcher.rundir.watchdog import Beat, Hang

HANG_TIMEOUT_S = 2

# argv: RUN_DIR, steps to beat, what then ("hang" or "exit"), seconds between beats.
WORKER = """
import faulthandler, os, signal, sys, time
from launcher.rundir.layout import RunDir
files, rank = RunDir.of(sys.argv[1]), int(os.environ["RANK"])
files.logs.mkdir(parents=True, exist_ok=True)
out = open(files.stack_dump(rank), "w")
faulthandler.register(signal.SIGUSR2, file=out, all_threads=True)

def stuck_in_forward():
    while True:
        time.sleep(0.1)

for step in range(1, int(sys.argv[2]) + 1):
    files.write_heartbeat(rank, step, "step")
    time.sleep(float(sys.argv[4]))
if sys.argv[3] == "hang":
    stuck_in_forward()
files.write_heartbeat(rank, 0, "exit")
"""
TORCHRUN = """
import os, subprocess, sys
rank, worker = sys.argv[1], sys.argv[2:]
done = subprocess.run([sys.executable, *worker], env={**os.environ, "RANK": rank}, start_new_session=True)
sys.exit(done.returncode)
"""
# The template's task, less the rendezvous: the watcher in the background, then exec torchrun.
NODE = """
(trap "" USR1 TERM INT HUP QUIT; exec "$PYTHON" -m launcher.run.hangwatch "$PLAN" $$) &
echo $! > "$WATCHER_PID"
exec "$PYTHON" "$TORCHRUN" "$RANK_HERE" "$WORKER" "$RUN_DIR" "$@"
"""


def two_node_plan(tmp_path: Path) -> Plan:
    raw = {
        "name": "hang",
        "model": {"name": "tiny-mlp"},
        "train": {"micro_batch_size": 4},
        "launch": {"device": "cpu", "nnodes": 2, "nproc_per_node": 1, "hang_timeout": HANG_TIMEOUT_S},
        "logging": {"dir": str(tmp_path / "runs")},
    }
    plan = resolve(validate(raw, "test"), Hardware(gpus=(), cpu_count=2), nnodes_allowed=True)
    Path(plan.run_dir).mkdir(parents=True)
    plan.plan_path.write_text(plan.to_json())
    return plan


def start_node(tmp_path: Path, plan: Plan, node: int, *worker_args: str) -> subprocess.Popen[str]:
    """Node `node` (rank `node`): its watcher and the stand-in torchrun, as the sbatch task starts them."""
    for name, text in (("worker.py", WORKER), ("torchrun.py", TORCHRUN)):
        (tmp_path / name).write_text(text)
    env = {
        **os.environ, "PYTHON": sys.executable, "PLAN": str(plan.plan_path), "RUN_DIR": plan.run_dir,
        "TORCHRUN": str(tmp_path / "torchrun.py"), "WORKER": str(tmp_path / "worker.py"),
        "RANK_HERE": str(node), "WATCHER_PID": str(tmp_path / f"watcher-{node}.pid"),
        "SLURMD_NODENAME": f"n{node + 1}",
    }  # fmt: skip
    return subprocess.Popen(
        ["bash", "-c", NODE, "node", *worker_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(node: subprocess.Popen[str], timeout_s: float) -> str:
    try:
        _, err = node.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The stand-in workers run in sessions of their own, as torchrun's do: kill them by name.
        for pid in [*child_pids(node.pid), node.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(node.pid, signal.SIGKILL)
        raise AssertionError(f"node {node.args} still running after {timeout_s} s") from None
    return err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_nodes_report_one_hang_with_every_stack_and_stop_their_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = two_node_plan(tmp_path)
    files = RunDir.from_plan(plan)
    since = time.time()
    began = time.monotonic()
    nodes = [start_node(tmp_path, plan, n, "2", "hang", "0.2") for n in (0, 1)]
    errs = [finish(node, 60) for node in nodes]
    assert time.monotonic() - began < 30  # the limit is 2 s; stacks and stopping take seconds more
    verdicts = [line for err in errs for line in err.splitlines() if "the run hung" in line]
    assert len(verdicts) == 1, errs  # one node decided and said it
    stacks = f"stacks in {files.stack_dump(0)}, {files.stack_dump(1)}; stopped the workers"
    assert verdicts[0].startswith(
        f"mplaunch: the run hung: no rank completed a step for {HANG_TIMEOUT_S}s "
        f"(launch.hang_timeout={HANG_TIMEOUT_S}): rank 0 in step 3 for "
    ), verdicts
    assert verdicts[0].endswith(stacks), verdicts
    assert verdicts[0].count("worker.py:") == 2, verdicts
    assert verdicts[0].count("in stuck_in_forward)") == 2, verdicts
    for rank in (0, 1):
        assert "stuck_in_forward" in files.stack_dump(rank).read_text()
    decision = Decision.read(decision_file(files), since)
    assert decision is not None
    assert decision.final
    assert decision.verdict == verdicts[0].removeprefix("mplaunch: ")
    assert decision.by.split(",")[0] in ("n1", "n2")

    # After srun: the verdict is the run's error, and a stop recorded beside it requeues nothing.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(
        f'#!/bin/bash\necho "$*" >> {tmp_path}/scontrol.calls\necho JobState=RUNNING\n'
    )
    (stub / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    files.append_event(2, "stop", "stopped at step 2")
    assert requeue.main([plan.run_dir, str(since), "137"]) == 1
    assert not (tmp_path / "scontrol.calls").exists()
    last = json.loads(files.metrics.read_text().splitlines()[-1])
    assert (last["event"], last["message"]) == ("error", decision.verdict)
    assert "job 91 is not requeued: its workers hung" in capsys.readouterr().out


def test_a_watcher_ignores_an_earlier_attempt_and_the_stop_signals_and_leaves_with_torchrun(
    tmp_path: Path,
) -> None:
    plan = two_node_plan(tmp_path)
    files = RunDir.from_plan(plan)
    then = time.time() - 100
    files.logs.mkdir(parents=True)
    files.write_heartbeat(1, 7, "step")  # an earlier attempt's rank 1, and its hang
    beat = json.loads(files.heartbeat(1).read_text())
    files.heartbeat(1).write_text(json.dumps({**beat, "time": then}))
    earlier = Hang((Beat(1, 7, then, 4242, "step"),), 2.0, then + 2)
    files.slurm_dir.mkdir()
    decision_file(files).write_text(
        Decision(earlier, "launch.hang_timeout=2", "n2, pid 1", "the run hung").to_json()
    )
    assert hang_since(Path(plan.run_dir), then - 1) is not None
    # Rank 0 alone, silent for twice the limit: with the earlier rank 1 taken for this attempt's,
    # every rank would look stuck. This attempt's rank 1 has not started: no hang yet.
    node = start_node(tmp_path, plan, 0, "1", "exit", str(2.5 * HANG_TIMEOUT_S))
    pid_file = tmp_path / "watcher-0.pid"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not pid_file.exists():
        time.sleep(0.05)
    watcher = int(pid_file.read_text())
    time.sleep(1.5)  # the watcher is up and reading (the signals are ignored from its start)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # what Slurm sends the steps
        os.kill(watcher, sig)
    time.sleep(0.5)
    assert alive(watcher), "a stop signal ended the watcher"
    err = finish(node, 30)
    ended = time.monotonic()
    while alive(watcher) and time.monotonic() - ended < 5:
        time.sleep(0.05)
    assert not alive(watcher), "the watcher outlived torchrun"
    assert err == ""
    assert not decision_file(files).exists()  # the earlier attempt's decision was cleared
    assert files.stack_dump(0).read_text() == ""  # nobody asked rank 0 for its stacks


def test_a_decision_reads_back_and_junk_is_none(tmp_path: Path) -> None:
    hang = Hang((Beat(0, 2, 100.0, 11, "step"), Beat(1, 2, 101.0, 12, "setup")), 10.0, 115.0)
    decision = Decision(hang, "launch.hang_timeout=10", "n1, pid 3", "the run hung: ...", final=True)
    path = tmp_path / "hang.json"
    path.write_text(decision.to_json())
    assert Decision.read(path, 115.0) == decision
    assert Decision.read(path, 115.5) is None  # taken before this attempt started
    for junk in (
        "",
        "[]",
        '{"hang": []}',
        json.dumps({**json.loads(decision.to_json()), "hang": {"stuck": []}}),
    ):
        path.write_text(junk)
        assert Decision.read(path, 0.0) is None, junk


def test_the_watcher_is_light() -> None:
    code = "import sys, launcher.run.hangwatch; print(sorted({'torch', 'deepspeed', 'jinja2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
