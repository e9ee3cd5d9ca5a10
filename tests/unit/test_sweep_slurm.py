"""A sweep as one Slurm job array (launcher.run.sweep_slurm): the array script, refusals, the dry
run, and a submission against stub sbatch/squeue: locks left naming each element, logs linked.

No cluster needed; tests/e2e/test_sweep_slurm.py runs it on the local two-node cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.recipe import schema as recipe_mod
from launcher.run import slurm
from launcher.run.sweep import Point, Sweep
from launcher.run.sweep_slurm import array_spec, submit
from launcher.rundir.lock import Holder

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "bert_tiny.yaml"
FIXED = ("launch.nproc_per_node=1", "launch.device=cpu", "slurm.gpus_per_node=0", "train.max_steps=6",
         "train.global_batch_size=null", "slurm.time=00:10:00")  # fmt: skip


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def read0(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def grid(tmp_path: Path, key: str = "train.micro_batch_size", values: tuple[str, ...] = ("2", "4")) -> Sweep:
    """A 2 x len(values) grid: optim.lr x `key`."""
    points = []
    for lr in ("1e-3", "1e-4"):
        for value in values:
            name = f"lr-{lr}-{key.rsplit('.', 1)[-1]}-{value}".replace(":", "")
            points.append(Point(len(points), name, (f"optimizer.lr={lr}", f"{key}={value}")))
    return Sweep(TINY, FIXED, tmp_path / "runs" / "sweep", tuple(points))


def run(sweep: Sweep, todo: list[Point] | None = None, max_parallel: int | None = 2, dry_run: bool = False,
        values: dict[str, str] | None = None) -> int:  # fmt: skip
    return submit(sweep, sweep.points if todo is None else todo, values=values or {}, template=None,
                  max_parallel=max_parallel, dry_run=dry_run)  # fmt: skip


@pytest.mark.parametrize(
    ("indices", "max_parallel", "spec"),
    [([0, 1, 2, 3], 2, "0-3%2"), ([1, 3], None, "1,3"), ([5, 0, 1, 2], 1, "0-2,5%1"), ([7], 3, "7%3")],
)
def test_array_spec(indices: list[int], max_parallel: int | None, spec: str) -> None:
    assert array_spec(indices, max_parallel) == spec


def test_dry_run_prints_the_array_and_its_points_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = grid(tmp_path)
    assert run(sweep, [sweep.points[1], sweep.points[3]], max_parallel=2, dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n")
    options = sbatch_options(out)
    assert "--array=1,3%2" in options
    assert "--job-name=sweep" in options
    assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:10:00", "--requeue",
            "--signal=USR1@120"} <= set(options)  # fmt: skip
    slurm_dir = sweep.dir / "slurm"
    assert f'--output="{slurm_dir}/slurm-%A_%a.out"' in options
    assert f'--error="{slurm_dir}/slurm-%A_%a.err"' in options
    assert not any(o.startswith("--gpus") for o in options)
    for point in (sweep.points[1], sweep.points[3]):
        assert f"  {point.index}) script={sweep.run_dir(point)}/slurm/job.sbatch ;;" in out
        assert f"  {point.index}  {point.name}: {sweep.run_dir(point)}" in out
    assert f"{sweep.run_dir(sweep.points[0])}/slurm" not in out
    assert not (tmp_path / "runs").exists()


def test_array_script_is_shellcheck_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = grid(tmp_path)
    run(sweep, dry_run=True)
    script = tmp_path / "array.sbatch"
    script.write_text(capsys.readouterr().out.split("mplaunch dry run:")[0])
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    done = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    ("key", "values", "named"),
    [("slurm.time", ("00:10:00", "00:20:00"), "slurm.time (00:10:00 for lr-1e-3-time-001000, lr-1e-4-time-001000; "
      "00:20:00 for lr-1e-3-time-002000, lr-1e-4-time-002000)"),
     ("launch.nnodes", ("1", "2"), "launch.nnodes (1 for lr-1e-3-nnodes-1, lr-1e-4-nnodes-1; "
      "2 for lr-1e-3-nnodes-2, lr-1e-4-nnodes-2)")],
)  # fmt: skip
def test_points_asking_for_different_resources_are_refused(
    tmp_path: Path, key: str, values: tuple[str, ...], named: str
) -> None:
    sweep = grid(tmp_path, key, values)
    with pytest.raises(UserError) as err:
        run(sweep, dry_run=True)
    [line] = err.value.lines
    assert f"the points differ in {named}; nothing was submitted" in line
    assert "separate sweeps" in line
    assert not (tmp_path / "runs").exists()


def test_max_parallel_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--max-parallel 0: at least 1"):
        run(grid(tmp_path), max_parallel=0, dry_run=True)


def test_a_point_with_a_bad_value_is_named(tmp_path: Path) -> None:
    sweep = grid(tmp_path, "train.micro_batch_size", ("2", "-1"))
    with pytest.raises(UserError) as err:
        run(sweep, dry_run=True)
    assert err.value.lines[0].startswith(
        "point lr-1e-3-micro_batch_size--1: override train.micro_batch_size: "
    )


def test_an_element_runs_its_points_job_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = grid(tmp_path)
    run(sweep, dry_run=True)
    array = tmp_path / "array.sbatch"
    array.write_text(capsys.readouterr().out.split("mplaunch dry run:")[0])
    for point in sweep.points:  # each point's job script, standing in: says who runs it
        script = sweep.run_dir(point) / "slurm" / "job.sbatch"
        script.parent.mkdir(parents=True)
        script.write_text(f'echo "{point.name} as $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $$"\n')
    env = {"PATH": os.environ["PATH"], "SLURM_ARRAY_JOB_ID": "40", "SLURM_JOB_ID": "43"}
    done = subprocess.run(["bash", str(array)], env={**env, "SLURM_ARRAY_TASK_ID": "2"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mplaunch: sweep element 40_2 (job 43) runs ")
    assert lines[1].startswith(f"{sweep.points[2].name} as 40 2 ")
    done = subprocess.run(["bash", str(array)], env={**env, "SLURM_ARRAY_TASK_ID": "9"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert "no point of this sweep has index 9" in done.stderr


# A point's job script run as node 1 of element 4240_2 (job 4242): stub srun runs the task script,
# scontrol records its calls, the workers' python records the lock file it sees and leaves a stop.
ELEMENT_STUBS = {
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
    'SLURM_NODEID=1 SLURM_PROCID=1 SLURMD_NODENAME=n2 exec "$@"\n',
    "scontrol": '#!/bin/bash\necho "$*" >> "$STUB_LOG/scontrol.calls"\nprintf "n1\\nn2\\n"\n',
    "getent": '#!/bin/bash\necho "10.0.0.1        $2"\n',
    "python": '#!/bin/bash\nif [ "$2" = launcher.run.requeue ]; then\n'
    '  printf "%s\\0" "$@" > "$STUB_LOG/requeue.argv"; exec "$REAL_PYTHON" "$@"\nfi\n'
    'if [ "$2" = launcher.run.hangwatch ]; then exit 0; fi\n'
    'printf "%s\\0" "$@" > "$STUB_LOG/python.argv"\n'
    'run_dir=$(dirname "${@: -1}")\ncp "$run_dir/.lock" "$STUB_LOG/lock.seen"\n'
    'printf \'{"kind": "event", "step": 3, "time": %s, "event": "stop"}\\n\' "$(date +%s)" >> "$run_dir/metrics.jsonl"\n',
}


def test_a_job_scripts_element_is_named_by_array_and_index(tmp_path: Path) -> None:
    """Run as an array element, the point's job script (and its requeue helper) names the element
    ARRAY_INDEX, not its own job id: Slurm reads one element's id as the whole array."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    for name, text in ELEMENT_STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    recipe = recipe_mod.load(TINY, [*FIXED, "launch.nnodes=2", f"logging.dir={tmp_path / 'runs'}"])
    plan = dataclasses.replace(slurm.resolve_for_cluster(recipe), command=(str(stubs / "python"),))
    Path(plan.run_dir).mkdir(parents=True)
    plan.plan_path.write_text(plan.to_json())
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(plan))
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "REAL_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert read0(log / "requeue.argv")[2:3] == [plan.run_dir], done.stderr
    assert "requeue 4240_2" in (log / "scontrol.calls").read_text().splitlines(), done.stdout
    assert "requeueing job 4240_2 (1 of 3)" in done.stdout
    assert json.loads((Path(plan.run_dir) / "slurm" / "requeues.json").read_text()) == {"4240_2": 1}
    assert json.loads((log / "lock.seen").read_text())["job_id"] == "4240_2"
    assert "mplaunch: job 4240_2 (restart 0)" in done.stdout
    assert "--rdzv-id=4242" in read0(log / "python.argv")  # the rendezvous keeps the element's own id


def test_holder_names_an_array_element(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert Holder.this_process().job_id == "9"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert Holder.this_process().job_id == "7_3"


# --------------------------------------------------------------------------- submitting against stubs

STUB_SBATCH = """#!/bin/bash
if [ "$1" = --test-only ]; then cat >/dev/null; echo "sbatch: Job 1 to start at now" >&2; exit 0; fi
printf '%s\\n' "$*" >> "$STUB_LOG/sbatch.calls"
cp "${@: -1}" "$STUB_LOG/submitted.sbatch"
echo "$STUB_JOB_ID;mplaunch"
"""
# squeue -h -j ID -o %T: the jobs in STUB_QUEUED are pending, the others gone.
STUB_SQUEUE = '#!/bin/bash\necho "$*" >> "$STUB_LOG/squeue.calls"\ncase " $STUB_QUEUED " in *" $3 "*) echo PENDING;; esac\n'


@pytest.fixture
def stub_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sbatch that submits job 77 (and accepts every --test-only), squeue that lists the jobs in STUB_QUEUED."""
    stubs, log = tmp_path / "stubs", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    for name, text in {"sbatch": STUB_SBATCH, "squeue": STUB_SQUEUE}.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_JOB_ID", "77")
    monkeypatch.setenv("STUB_QUEUED", "")
    return log


def lock_of(run_dir: Path) -> dict[str, object]:
    text = (run_dir / ".lock").read_text()
    return json.loads(text) if text else {}


def test_submit_writes_each_point_and_one_array_and_leaves_the_locks_naming_the_elements(
    tmp_path: Path, stub_slurm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = grid(tmp_path)
    todo = [sweep.points[0], sweep.points[2], sweep.points[3]]
    assert run(sweep, todo, max_parallel=2) == 0
    out = capsys.readouterr().out
    names = ", ".join(f"{p.name} (77_{p.index})" for p in todo)
    assert f"mplaunch: submitted job array 77 (3 points, at most 2 at a time): {names}\n" in out
    assert f"tail -f {sweep.dir}/slurm/slurm-77_*.out" in out
    assert (stub_slurm / "sbatch.calls").read_text().splitlines() == [
        f"--parsable {sweep.dir}/slurm/array.sbatch"
    ]
    assert "--array=0,2-3%2" in sbatch_options((stub_slurm / "submitted.sbatch").read_text())
    for point in todo:
        run_dir = sweep.run_dir(point)
        job_script = run_dir / "slurm" / "job.sbatch"
        recipe = recipe_mod.load(sweep.recipe, sweep.run_overrides(point))
        assert job_script.read_text() == slurm.render(slurm.resolve_for_cluster(recipe))
        assert (run_dir / "command.txt").read_text() == f"sbatch {job_script}\n"
        assert (run_dir / "recipe.yaml").exists()
        assert lock_of(run_dir)["job_id"] == f"77_{point.index}"
        assert lock_of(run_dir)["state"] == "submitted"
        link = run_dir / "slurm" / f"slurm-77_{point.index}.out"
        assert link.is_symlink()
        assert link.readlink() == sweep.dir / "slurm" / f"slurm-77_{point.index}.out"
    assert not sweep.run_dir(sweep.points[1]).exists()


def test_a_queued_or_finished_point_is_skipped_and_the_rest_submitted(
    tmp_path: Path, stub_slurm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = grid(tmp_path)
    assert run(sweep, list(sweep.points[:2])) == 0
    finished = sweep.run_dir(sweep.points[1])
    (finished / "FINISHED").write_text('{"step": 6}')
    capsys.readouterr()
    monkeypatch.setenv("STUB_QUEUED", "77_0")
    monkeypatch.setenv("STUB_JOB_ID", "78")
    assert run(sweep) == 0  # point 0: 77_0 is still queued; point 1 has finished
    out = capsys.readouterr().out
    assert f"mplaunch: point {sweep.points[0].name} skipped: {sweep.run_dir(sweep.points[0])} is in use by " \
           "another run: Slurm job 77_0 (submitted from" in out  # fmt: skip
    assert f"mplaunch: {finished} already finished 6 steps; point {sweep.points[1].name} skipped" in out
    assert "submitted job array 78 (2 points" in out
    assert "-j 77_0" in (stub_slurm / "squeue.calls").read_text()
    assert "--array=2-3%2" in sbatch_options((stub_slurm / "submitted.sbatch").read_text())
    assert lock_of(sweep.run_dir(sweep.points[0]))["job_id"] == "77_0"
    assert [lock_of(sweep.run_dir(p)).get("job_id") for p in sweep.points[2:]] == ["78_2", "78_3"]
    # Once 77_0 has left the queue, a rerun submits what is left: point 0 only.
    monkeypatch.setenv("STUB_JOB_ID", "79")
    monkeypatch.setenv("STUB_QUEUED", "78_2 78_3")
    capsys.readouterr()
    assert run(sweep, [sweep.points[0]]) == 0
    assert "submitted job array 79 (1 points" in capsys.readouterr().out
    assert "--array=0%2" in sbatch_options((stub_slurm / "submitted.sbatch").read_text())


def test_nothing_left_to_submit(tmp_path: Path, stub_slurm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = grid(tmp_path)
    assert run(sweep, []) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert not (stub_slurm / "sbatch.calls").exists()


def test_sbatch_refusing_the_array_leaves_no_lock_naming_a_job(
    tmp_path: Path, stub_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "stubs" / "sbatch").write_text(
        '#!/bin/bash\nif [ "$1" = --test-only ]; then exit 0; fi\necho "sbatch: error: Batch job submission '
        'failed: Invalid job array specification" >&2\nexit 1\n'
    )
    sweep = grid(tmp_path)
    with pytest.raises(UserError, match="sbatch refused the job: sbatch: error: Batch job submission failed"):
        run(sweep)
    assert all(lock_of(sweep.run_dir(p)) == {} for p in sweep.points)
