"""The worker: one per rank, started by torchrun as `python -m launcher.worker.train RUN_DIR/plan.json`.

`main` sets up (process group, seeds, data, model, backend, resume) and
`fit` is the loop. A rank never prints a traceback: it prints one line
(`mplaunch: rank N: error: ...`) and then writes the traceback to
RUN_DIR/logs/rank-N.err, so the launcher can show the failing rank's error
instead of torchrun's noise, even when the disk is too full for the file.
Each rank beats a heartbeat (RUN_DIR/logs/rank-N.heartbeat) as each setup phase
begins, naming it (launcher.run.progress.Phases), after every step and checkpoint,
and dumps its threads' stacks to RUN_DIR/logs/rank-N.stack on SIGUSR2: the
launcher's hang watch (launcher.rundir.watchdog) reads both.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.plan import processes
from launcher.plan.resolve import Plan
from launcher.run.progress import Phases
from launcher.rundir import space
from launcher.rundir.layout import RunDir
from launcher.rundir.watchdog import collective_timeout_s
from launcher.worker import audit, data, evaluation, fp8_xray, xray
from launcher.worker.backends import Backend, LossScaleFloor, NonFiniteStep, load_backend
from launcher.worker.checkpointer import Checkpointer, seed_all
from launcher.worker.metrics import Meter
from launcher.worker.model_setup import document_positions, model_for
from launcher.worker.models import ModelError
from launcher.worker.precision import set_tf32
from launcher.worker.ranks import Dist, StopAgreement, StopRequest, describe_signals

EXIT_OK = 0
EXIT_FAILED = 1
# A file system with less free space than this is full for a checkpoint: torch.save's
# opaque write errors then mean no space left, whatever the few bytes left over.
NEARLY_FULL_BYTES = 1 << 20
_TORCH_WRITE_FAILED = re.compile(r"file write failed|inline_container\.cc|PytorchStreamWriter")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Deprecation chatter from inside DeepSpeed/torch.distributed is not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    plan = Plan.from_json(Path(args[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    files = RunDir.from_plan(plan)
    _dump_stacks_on_sigusr2(files, rank)  # creates RUN_DIR/logs
    files.write_heartbeat(rank, 0, "setup", "connecting to the other ranks")
    stop = StopRequest()
    try:
        # The second Ctrl-C's KeyboardInterrupt may come while an error is being reported (a peer
        # that stopped at once closes its connections first): caught here, around the reporting.
        try:
            return run(plan, stop)
        except (ModelError, LossScaleFloor, NonFiniteStep, ValueError, FileNotFoundError) as exc:
            return _fail(plan, rank, _disk_full(plan, exc) or _explain(plan, exc))
        except Exception as exc:
            return _fail(plan, rank, _disk_full(plan, exc) or f"{type(exc).__name__}: {exc}".rstrip(": "))
    except KeyboardInterrupt:
        return _interrupted(plan, rank, stop)
    finally:
        files.write_heartbeat(rank, 0, "exit")


def _dump_stacks_on_sigusr2(files: RunDir, rank: int) -> None:
    """On SIGUSR2 write every thread's Python stack to RUN_DIR/logs/rank-N.stack (the hang watch
    sends it). faulthandler writes from its C signal handler, so a rank stuck in C code or in a
    collective answers too."""
    try:
        files.logs.mkdir(parents=True, exist_ok=True)
        out = open(files.stack_dump(rank), "w")  # noqa: SIM115 (kept open for the process's life)
    except OSError:
        return
    faulthandler.register(signal.SIGUSR2, file=out, all_threads=True)


def _disk_full(plan: Plan, exc: BaseException) -> str | None:
    """ "no space left on device: PATH (N bytes free); ..." when `exc` is a full file system's doing.

    An OSError with errno ENOSPC names its path. torch.save's writer fails on a full disk
    with an opaque RuntimeError from inline_container.cc ("file write failed", "unexpected
    pos ..."), naming no path: it counts when the checkpoint directory's (or the run
    directory's) file system has less than NEARLY_FULL_BYTES free.
    """
    files = RunDir.from_plan(plan)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        path = str(exc.filename) if exc.filename else str(files.checkpoints)
        # What the write found, not the room removing its partial files made since.
        free = exc.free_bytes if isinstance(exc, space.DiskFull) else space.free_bytes(path)
    elif isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)):
        candidates = [(space.free_bytes(str(p)), str(p)) for p in (files.checkpoints, files.path)]
        known = sorted((f, p) for f, p in candidates if f is not None)
        if not known or known[0][0] >= NEARLY_FULL_BYTES:
            return None
        free, path = known[0]
    else:
        return None
    shown = "unknown bytes free" if free is None else f"{free:,} bytes free"
    return (
        f"no space left on device: {path} ({shown}); free space there (or set checkpoint.dir or "
        "logging.dir to a larger file system) and run again: it resumes from the latest complete checkpoint"
    )


def _explain(plan: Plan, exc: Exception) -> str:
    if isinstance(exc, LossScaleFloor):
        floor = plan.precision.loss_scale.min if plan.precision.loss_scale else 1.0
        return (
            f"fp16 gradients overflow even at the minimum loss scale {floor:g}: the run cannot continue in fp16. "
            "Use precision.dtype=bf16 (same speed on Ampere or newer GPUs, no loss scaling), or lower the "
            "learning rate; the last complete checkpoint is kept"
        )
    return str(exc)  # NonFiniteStep and the rest carry their whole message


def _fail(plan: Plan, rank: int, message: str) -> int:
    """Print the rank's one-line error, then write its report (which a full disk may lose)."""
    message = " ".join(message.split()) or "an error without a message (the traceback is in the rank's log)"
    print(f"mplaunch: rank {rank}: error: {message}", file=sys.stderr, flush=True)
    RunDir.from_plan(plan).write_rank_error(rank, message, traceback.format_exc())
    return EXIT_FAILED


def _interrupted(plan: Plan, rank: int, stop: StopRequest) -> int:
    """A rank stopped at once (a second Ctrl-C): rank 0 says, and records as an "interrupted" event,
    which checkpoint in progress it abandoned, if any, and where a rerun resumes."""
    if rank == 0 and stop.at_once is not None:
        files = RunDir.from_plan(plan)
        message = stop.describe_at_once(files.checkpoint_steps())
        print(f"mplaunch: {message}", file=sys.stderr, flush=True)
        files.append_event(files.last_step(), "interrupted", message)
    return _fail(plan, rank, "interrupted")


@dataclass
class Run:
    """Everything the loop works with, built once per rank by `setup`."""

    plan: Plan
    backend: Backend
    batches: data.Batches
    evals: data.Batches | None
    meter: Meter
    ckpt: Checkpointer
    stop: StopRequest
    d: Dist
    start: int  # the step training starts (or resumes) at
    phases: Phases  # how long setting up took, by phase
    fp8: fp8_xray.Fp8XRay | None = None  # the fp8 layers' x-ray (precision.dtype fp8)


def run(plan: Plan, stop: StopRequest) -> int:
    """Set up this rank, resume if there is a checkpoint, train, and shut down cleanly."""
    d = _init_distributed(plan)
    try:
        r = setup(plan, d, stop)
        try:
            return fit(r)
        finally:
            r.meter.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(plan: Plan, d: Dist, stop: StopRequest) -> Run:
    """Data, model, backend and resume state of this rank."""
    phases = Phases.for_rank(RunDir.from_plan(plan), d.rank)  # says each phase as it begins
    phases.begin(_loading_data(plan))
    seed_all(plan.recipe.train.seed)
    tokens = data.load_tokens(plan, d.rank, d.barrier)
    phases.end("data", then="building the model")
    # Same seed on every rank for the weights; the backends also broadcast rank 0's.
    model, notes = model_for(plan)
    positions = False
    if data.documents(tokens, plan):  # packed causal-lm rows: can the model be told where documents start?
        positions, note = document_positions(model)
        notes.append(note)
    for note in notes if d.rank == 0 else []:
        print(f"mplaunch: {note}", flush=True)
    phases.end("model", then=f"starting {processes.BACKEND_NAMES[plan.recipe.backend]}")
    phases.begin(_starting_backend(plan))  # once DeepSpeed is imported: does it build its ops first?
    seed_all(plan.recipe.train.seed + d.rank)
    backend = load_backend(plan, model)
    phases.end("backend", then="verifying and loading the latest checkpoint, if there is one")
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    train = data.Batches(tokens, rows.train, plan, d.rank, positions=positions)
    evals: data.Batches | None = None
    if len(rows.eval):
        evals = data.Batches(tokens, rows.eval, plan, d.rank, evaluation=True, positions=positions)
    ckpt = Checkpointer(plan, RunDir.from_plan(plan), d)
    start = ckpt.restore(backend)
    phases.end("restore")
    meter = Meter(plan, d.rank == 0, start, _flops_per_step(plan))
    ckpt.report(meter)  # checkpoints the restore rejected, as metrics events
    sharded = getattr(
        backend, "sharded", None
    )  # what FSDP2's fully_shard was applied to (the dry run's `fsdp2`)
    if sharded and d.rank == 0:  # recorded only: the engine printed it as it applied it
        meter.write(
            {"kind": "event", "step": start, "time": time.time(), "event": "sharding", "message": sharded}
        )
    fp8 = fp8_xray.Fp8XRay.of(backend.model) if plan.precision.dtype == "fp8" else None
    return Run(plan, backend, train, evals, meter, ckpt, stop, d, start, phases, fp8)


def _loading_data(plan: Plan) -> str:
    d = plan.recipe.data
    if d.target is not None:
        return f"loading the dataset of data.target {d.target}"
    if d.kind == "synthetic":
        return "making the synthetic data"
    return "loading the data (tokenizing it into the token cache unless that is done)"


def _starting_backend(plan: Plan) -> str:
    """ "building DeepSpeed's CPU communication op (first run only, ~1-2 min)", or "starting DeepSpeed"."""
    if not processes.deepspeed_ops(plan.recipe, plan.device):
        return processes.backend_starting(plan.recipe, plan.device, {})
    from deepspeed.git_version_info import installed_ops  # the ops built at install (DS_BUILD_OPS=1)

    return processes.backend_starting(plan.recipe, plan.device, installed_ops)


def fit(r: Run) -> int:
    """The training loop: one optimizer step per iteration, from `r.start` to train.max_steps."""
    t, meter, backend = r.plan.recipe.train, r.meter, r.backend
    files = RunDir.from_plan(r.plan)

    def beat(step: int, phase: str) -> None:  # the hang watch's sign of life (a small file, no sync)
        files.write_heartbeat(r.d.rank, step, phase)

    compiling = "compiling the model for the first step (train.compile)"
    r.phases.begin(compiling if r.plan.recipe.train.compile else "running the first step", "train", r.start)
    steps = data.loader(r.batches, r.start, t.max_steps, r.plan.recipe.data.num_workers)
    meter.event(
        r.start,
        "resume" if r.start else "start",
        f"training from step {r.start} to {t.max_steps}",
        from_step=r.start,
    )
    agreement = StopAgreement(r.d)
    xray_every = r.plan.recipe.logging.precision_every
    for step in range(r.start, t.max_steps):
        waited = time.perf_counter()
        micro = next(steps)
        meter.data_wait(time.perf_counter() - waited)
        done = step + 1
        backend.measure_grads = r.plan.recipe.logging.memory_report and step == r.start + 1
        _arm_xray(r, xray.mode(done, xray_every))
        lr = backend.lr()  # the step's own: after it the schedule has moved on (a host number)
        first = audit.FirstUpdate(backend) if done == 1 else None  # the optimizer audit's sample of step 1
        stats = backend.train_step(micro)  # forward, scaled backward, optimizer step (maybe skipped)
        beat(done, "step")
        meter.record(stats, lr)
        if first is not None:
            first.record(backend, meter)
        if stats.xray is not None:
            meter.precision(done, _with_fp8(r, stats.xray))
        if step == r.start:
            r.phases.end("first step")
            meter.event(done, "ready", r.phases.describe(done), seconds=r.phases.seconds)
        if stats.skipped:
            meter.overflow(done, backend.loss_scale())
        if backend.measure_grads:
            _write_memory_report(r.plan, backend, r.d.rank, done)
        if meter.due(done):
            meter.flush(done, backend, r.batches.position(done)[0])
        if r.evals is not None and t.eval_every and done % t.eval_every == 0:
            meter.eval(done, evaluation.evaluate(backend, r.evals, r.plan, r.d))
        stopping = agreement.step(r.stop.signal is not None)  # every rank stops at the same step
        if r.ckpt.due(done, stopping):
            r.stop.saving = done  # what a second Ctrl-C abandons
            r.ckpt.save(done, backend, meter, r.batches.position(done))
            r.stop.saving = None
            beat(done, "checkpoint")
        if stopping:
            agreement.close()
            return _stopped(r, done, agreement.who(r.stop.signal))
    agreement.close()
    r.ckpt.finish(t.max_steps)
    meter.event(t.max_steps, "finish", f"finished {t.max_steps} steps")
    return EXIT_OK


def _arm_xray(r: Run, mode: str | None) -> None:
    """Set this step's precision x-ray (None, "stats", "sketch"); on fp8 runs the fp8 layers' hooks
    are on for x-ray steps only."""
    r.backend.xray = mode
    if mode and r.fp8 is not None:
        r.fp8.arm()


def _with_fp8(r: Run, seen: dict[str, Any]) -> dict[str, Any]:
    """The x-ray record with the fp8 layers' columns (fp8 runs; a collective on every rank)."""
    return r.fp8.finish(seen, r.d.world) if r.fp8 is not None and r.fp8.armed else seen


def _stopped(r: Run, step: int, signals: dict[int, int]) -> int:
    """After a stop request's checkpoint: record the stop, naming which ranks got which signal (a
    Slurm job's script requeues on it; the launcher exits 128 + the signal, the run unfinished).

    Every rank exits 0 all the same, so that torchrun does not restart them (launch.max_restarts).
    """
    r.meter.event(
        step,
        "stop",
        f"stopped at step {step}: {describe_signals(signals, r.d.world)}; checkpoint saved, run again to resume",
        signals={str(rank): signal.Signals(signum).name for rank, signum in sorted(signals.items())},
    )
    r.d.barrier()
    return EXIT_OK


def _write_memory_report(plan: Plan, backend: Backend, rank: int, step: int) -> None:
    import json

    report = {"rank": rank, "step": step, "world_size": plan.world_size, "bytes": backend.state_bytes()}
    path = RunDir.from_plan(plan).memory_report(rank)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _flops_per_step(plan: Plan) -> float | None:
    from launcher.plan.estimate import flops

    return flops.flops_per_step(plan.shape, plan.recipe.data.seq_len, plan.batch.global_batch_size)


def _init_distributed(plan: Plan) -> Dist:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if plan.recipe.backend == "deepspeed" and plan.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if plan.device == "cuda":
        torch.cuda.set_device(local_rank)
        set_tf32(plan.precision)
    control = None
    if world > 1 or "MASTER_ADDR" in os.environ:
        # A collective waiting on a stuck rank fails after this instead of gloo's 30 min; it is
        # longer than the launcher's hang watch, which reports a hang first, with stacks.
        timeout = timedelta(seconds=collective_timeout_s(plan.recipe.launch.hang_timeout))
        dist.init_process_group(backend=plan.dist_backend, rank=rank, world_size=world, timeout=timeout)
        # Host-side agreement (stop requests, barriers) goes over gloo so it never waits on the GPU stream.
        control = dist.new_group(backend="gloo", timeout=timeout) if plan.dist_backend != "gloo" else None
    return Dist(rank, world, local_rank, control)


def _exit(code: int) -> None:
    """Leave without running interpreter and C++ static teardown.

    Everything the run owns is closed by now (process group destroyed, metrics
    and checkpoints flushed and synced). What remains are library threads
    (gloo, DeepSpeed) whose destructors at interpreter exit now and then abort
    with "terminate called without an active exception", turning a finished
    run into a failed one.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
