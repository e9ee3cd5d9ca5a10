"""Inside a Slurm job, once its workers have exited: requeue the job if they stopped on a signal.

The sbatch script runs `python -m launcher.run.requeue RUN_DIR SINCE STATUS` after
srun returns, on the batch host. The workers' side of the contract is only what they
record: on a stop request every rank checkpoints, rank 0 writes a "stop" event
to metrics.jsonl, and they exit without writing FINISHED. A stop recorded at or
after SINCE (Unix seconds, when this attempt's srun started) is this attempt's,
so the job is requeued and resumes from that checkpoint. Workers that failed
(STATUS not 0) without a stop get their cause (launcher.rundir.layout.RunDir.failed_rank)
printed to the job's log and recorded as an "error" event in metrics.jsonl, as
a local launch does, so that `mplaunch report` calls the run crashed. Workers the
nodes' hang watch stopped (launcher.run.hangwatch: a decision at or after SINCE) get
the watch's verdict recorded the same way, and the job is not requeued, stop or not:
it would hang again.

Light side: no torch import, and nothing the workers import.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from launcher.errors import UserError
from launcher.plan.resolve import Plan
from launcher.run.hangwatch import Decision, hang_since
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.rundir.lock import Holder
from launcher.rundir.metrics_log import read_metrics


def after_stop(run_dir: Path, since_s: float) -> bool:
    """Requeue this Slurm job if its workers stopped (and checkpointed) since `since_s`.

    Outside Slurm (no SLURM_JOB_ID), or when the workers did not stop on a
    signal, it does nothing. A job Slurm is already ending or requeueing
    (cancelled, timed out, preempted) is left to Slurm. At most
    slurm.max_requeues requeues per job id, counted in RUN_DIR/slurm/requeues.json. An element of
    a sweep's job array is requeued alone, by its ARRAY_INDEX id (launcher.rundir.lock.Holder.this_process).
    Never raises: the checkpoint is already safe.

    Returns:
        True when `scontrol requeue` accepted the job.
    """
    job_id = Holder.this_process().job_id
    if not job_id or not _stopped_since(run_dir, since_s):
        return False
    state = _job_state(job_id)
    if state not in (None, "RUNNING"):
        _log(f"job {job_id} is {state}; Slurm ends or requeues it, so mplaunch does not")
        return False
    files = RunDir.of(run_dir)
    try:
        cap = Plan.from_json(files.plan_file.read_text()).recipe.slurm.max_requeues
    except (OSError, ValueError) as exc:
        _log(f"cannot read {files.plan_file} ({exc}); not requeueing job {job_id}")
        return False
    counts_path = files.slurm_requeues
    counts = _read_counts(counts_path)
    used = counts.get(job_id, 0)
    if used >= cap:
        _log(f"job {job_id} was requeued {used} times (slurm.max_requeues={cap}); not again. "
             f"The checkpoint is saved: resubmit {shlex.quote(str(files.slurm_script))} to continue")  # fmt: skip
        return False
    counts[job_id] = used + 1
    _write_counts(counts_path, counts)
    # The requeue ends this job at once (SIGTERM to every process), so say it first.
    _log(f"requeueing job {job_id} ({used + 1} of {cap}); it resumes from the latest checkpoint")
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        _log(f"scontrol requeue {job_id} failed: {exc}")
        return False
    if done.returncode != 0:
        _log(f"scontrol requeue {job_id} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.returncode == 0


def _stopped_since(run_dir: Path, since_s: float) -> bool:
    try:
        stops = read_metrics(run_dir).named("stop")
    except UserError:  # no metrics yet: the workers never started
        return False
    return any(float(e.get("time", 0)) >= since_s for e in stops)


def _job_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else None


def _read_counts(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_counts(path: Path, counts: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, json.dumps(counts, indent=2) + "\n")


def _log(message: str) -> None:
    print(f"mplaunch: slurm: {message}", flush=True)


def record_failure(run_dir: Path, status: int) -> None:
    """Print and record (an "error" event) why the workers failed; never raises."""
    files = RunDir.of(run_dir)
    first = files.failed_rank()
    headline = (
        first.headline
        if first is not None
        else f"the workers exited with status {status} without an error report"
    )
    _log(headline)
    files.append_event(files.last_step(), "error", headline)


def record_hang(run_dir: Path, hang: Decision) -> None:
    """Record (an "error" event) the hang watch's verdict, printed here too when the deciding
    node could not finish it; never raises."""
    files = RunDir.of(run_dir)
    if not hang.final:
        print(f"mplaunch: {hang.verdict}", file=sys.stderr, flush=True)
    _log(f"job {Holder.this_process().job_id or '?'} is not requeued: its workers hung, and would again")
    if not files.append_event(files.last_step(), "error", hang.verdict):
        _log(f"could not record the hang in {files.metrics}")


def main(argv: Sequence[str]) -> int:
    """`python -m launcher.run.requeue RUN_DIR SINCE [STATUS]` (the sbatch script's call): 0 when the
    job was requeued; a hang, or a failure (STATUS not 0) that was no stop, is recorded."""
    run_dir, since, *rest = argv
    hang = hang_since(Path(run_dir), float(since))
    if hang is not None:
        record_hang(Path(run_dir), hang)
        return 1
    if after_stop(Path(run_dir), float(since)):
        return 0
    status = int(rest[0]) if rest else 0
    if status != 0 and not _stopped_since(Path(run_dir), float(since)):
        record_failure(Path(run_dir), status)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
