"""What a run shows and records: metrics.jsonl, the trackers (TensorBoard, W&B, MLflow), and the console (rank 0).

The loss is accumulated on the device and read back only at log intervals,
so the training loop never waits for the GPU between steps; so is the first
step whose loss or gradient norm was not finite, read back at every log
interval and before every save. Record fields are documented in README.md
("Run directory"). Every record written is handed to the trackers (launcher.worker.trackers).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from launcher.analysis.health import PrecisionHealth
from launcher.plan.resolve import Plan
from launcher.run import progress
from launcher.rundir.layout import RunDir
from launcher.worker.backends import Backend, NonFiniteStep, StepStats, non_finite_message
from launcher.worker.trackers import Trackers


class NonFiniteLoss(NonFiniteStep):
    """The loss of a step became NaN or infinite."""


class NonFiniteGrads(NonFiniteStep):
    """The gradients of a step became NaN or infinite while its loss was finite."""


# The first bad step is kept on the device as one int64: 4 * step + what went wrong, so
# the minimum over steps (and over ranks) is the earliest step, a bad loss before bad
# gradients at the same step (a NaN loss makes NaN gradients; it is the cause to report).
_LOSS, _GRADS = 1, 2
_NONE = 2**62


class Meter:
    """Accumulates per-step statistics and writes one record per log interval.

    Args:
        plan: the run's plan.
        is_rank0: only rank 0 writes files and prints.
        start_step: the step the run starts (or resumes) at.
        flops_per_step: model FLOPs of one optimizer step, if known.
    """

    def __init__(
        self, plan: Plan, is_rank0: bool, start_step: int, flops_per_step: float | None = None
    ) -> None:
        self.plan = plan
        self.world = plan.world_size
        self.is_rank0 = is_rank0
        self.every = plan.recipe.logging.every_steps
        self.flops_per_step = flops_per_step
        self.samples_per_step = plan.batch.global_batch_size
        self.tokens_per_step = plan.batch.global_batch_size * plan.recipe.data.seq_len
        self.path = RunDir.from_plan(plan).metrics
        self.console = Console(plan) if is_rank0 else None
        self.health = PrecisionHealth(plan) if is_rank0 else None
        self.step = start_step  # the step the last `record` was of
        self.first_bad: torch.Tensor | None = None  # 4 * step + _LOSS/_GRADS, or _NONE
        self._reset(time.perf_counter())
        self.trackers: Trackers | None = None
        if self.console is not None:  # rank 0; a tracker failing to start records an event already
            self.trackers = Trackers(plan, self.event, self.console.note)
            self.trackers.start(start_step)

    def _reset(self, now: float) -> None:
        self.interval_start = now
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_count = 0
        self.steps = 0
        self.data_wait_s = 0.0
        self.grad_norm: Any = None
        self.lr: float | None = None
        self.skipped_in_interval = 0

    def data_wait(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def record(self, stats: StepStats, lr: float | None = None) -> None:
        """Add one optimizer step; no host-device synchronisation.

        Args:
            lr: the learning rate the step used (Backend.lr() read before the step: after it the
                schedule has moved on to the next step's); the interval's record logs the last one.
        """
        self.steps += 1
        self.lr = lr
        self.step += 1
        if stats.skipped:
            # A skipped fp16 step has an overflowed loss that says nothing about training,
            # and the loss scaler kept its gradients out of the weights.
            self.skipped_in_interval += 1
        else:
            self.loss_sum = self.loss_sum + stats.loss
            self.loss_count += 1
            self._watch(stats)
        self.grad_norm = stats.grad_norm

    def _watch(self, stats: StepStats) -> None:
        """Keep the first step whose loss or gradient norm is not finite, on the device."""
        loss_ok = torch.isfinite(stats.loss.detach()).all()
        g = stats.grad_norm
        if isinstance(g, torch.Tensor):
            grads_ok = torch.isfinite(g.detach().to(loss_ok.device, non_blocking=True)).all()
            grads = torch.where(grads_ok, _NONE, 4 * self.step + _GRADS)
        else:  # a host number (or none): known here without a sync
            code = _NONE if g is None or math.isfinite(float(g)) else 4 * self.step + _GRADS
            grads = torch.full((), code, device=loss_ok.device)
        here = torch.where(loss_ok, grads, 4 * self.step + _LOSS)
        self.first_bad = here if self.first_bad is None else torch.minimum(self.first_bad, here)

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) ends a log interval: every logging.every_steps-th, the last,
        and the run's first, which `mplaunch report` starts its curves at (the LR warmup, the
        loss); its one-step interval holds the first step's one-time costs."""
        return step == 1 or step % self.every == 0 or step == self.plan.recipe.train.max_steps

    def _global_sum(self) -> torch.Tensor | float:
        """The interval's loss sum averaged over ranks: the loss of the whole global batch, not rank 0's share."""
        if self.world == 1 or not isinstance(self.loss_sum, torch.Tensor):
            return self.loss_sum
        import torch.distributed as dist

        total = self.loss_sum.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def check_finite(self) -> None:
        """Raise, on every rank alike, if the loss or the gradient norm of any step so far was not finite.

        A collective (every rank calls it at the same step) and one read from the device.

        Raises:
            NonFiniteLoss: a rank's loss was NaN or infinite; the message names the first such step.
            NonFiniteGrads: the gradients were, while every rank's loss was finite.
        """
        if self.first_bad is None:  # no step recorded yet (the same on every rank)
            return
        first = self.first_bad.clone()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step, kind = divmod(int(first), 4)
        if kind == 0:
            return
        error = NonFiniteLoss if kind == _LOSS else NonFiniteGrads
        raise error(non_finite_message(step, self.plan.precision.dtype, loss_finite=kind == _GRADS))

    def flush(self, step: int, backend: Backend, epoch: int) -> dict[str, Any]:
        """Check the interval's steps, then read its numbers back from the device, record and show them.

        Raises:
            NonFiniteLoss, NonFiniteGrads: as check_finite.
        """
        self.check_finite()
        loss = float(self._global_sum()) / self.loss_count if self.loss_count else float("nan")
        now = time.perf_counter()
        elapsed = max(now - self.interval_start, 1e-9)
        step_time = elapsed / max(self.steps, 1)
        record: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "time": time.time(),
            "loss": loss,
            "lr": self.lr,
            "loss_scale": backend.loss_scale(),
            "skipped_steps": backend.skipped_steps(),
            "grad_norm": _number(self.grad_norm),
            "samples_per_s": self.samples_per_step / step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "data_wait_frac": min(1.0, self.data_wait_s / elapsed),
            "overflow_rate": self.skipped_in_interval / max(self.steps, 1),
            "epoch": epoch,
            **self._hardware(step_time),
        }
        self._reset(now)
        if self.console is not None and self.health is not None:  # rank 0
            self.write(record)
            self.console.show(record)
            for warning in self.health.check(record):
                self.event(step, "warning", f"warning: {warning}")
        return record

    def _hardware(self, step_time: float) -> dict[str, Any]:
        out: dict[str, Any] = {"flops_per_step": self.flops_per_step, "tflops": None, "mfu": None}
        if self.flops_per_step:
            from launcher.plan.estimate import flops

            world = self.plan.world_size
            out["tflops"] = self.flops_per_step / step_time / world / 1e12
            if self.plan.device == "cuda":
                name = torch.cuda.get_device_name()
                # fp32 matmuls run on TF32 tensor cores when allowed: measure against that peak.
                out["mfu"] = flops.mfu(
                    self.flops_per_step, step_time, name, self.plan.precision.matmul_dtype, world
                )
        if self.plan.device == "cuda":
            mine = torch.tensor(
                [torch.cuda.max_memory_allocated(), torch.cuda.memory_reserved()], device="cuda"
            )
            out["mem_peak_bytes"], out["mem_reserved_bytes"] = (int(x) for x in mine.tolist())
            if self.world > 1:  # the rank closest to running out is the one that matters
                import torch.distributed as dist

                dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            out["mem_peak_bytes_max"], out["mem_reserved_bytes_max"] = (int(x) for x in mine.tolist())
        else:
            out["mem_peak_bytes"] = out["mem_reserved_bytes"] = None
            out["mem_peak_bytes_max"] = out["mem_reserved_bytes_max"] = None
        return out

    def event(self, step: int, event: str, message: str, **fields: Any) -> None:
        """Record and print a notable event (rank 0 only)."""
        if self.console is None:
            return
        self.write(
            {"kind": "event", "step": step, "time": time.time(), "event": event, "message": message, **fields}
        )
        self.console.note(message)

    def overflow(self, step: int, scale: float | None) -> None:
        """Record an fp16 step the loss scaler skipped, and the loss scale it lowered to (rank 0 only;
        only fp16 skips steps, and fp16 always has a loss scale)."""
        self.event(
            step,
            "overflow",
            f"step {step}: fp16 gradients overflowed; step skipped, loss scale now {scale:g}",
            loss_scale=scale,
        )

    def precision(self, step: int, seen: dict[str, Any]) -> None:
        """Record a precision x-ray (rank 0 only) and show the events its judge draws from it."""
        if self.console is None or self.health is None:
            return
        self.write({"kind": "precision", "step": step, "time": time.time(), **seen})
        for event, message, fields in self.health.xray(step, seen):
            self.event(step, event, message, **fields)

    def eval(self, step: int, results: Mapping[str, Any]) -> None:
        """Record and print an evaluation (rank 0 only): launcher.worker.evaluation's numbers."""
        if self.console is None:
            return
        self.write({"kind": "eval", "step": step, "time": time.time(), **results})
        self.console.note(f"step {step}: {describe_eval(results)}")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.write(record)

    def close(self) -> None:
        """End the trackers' runs (finished, stopped or failed, as the events recorded said)."""
        if self.trackers is not None:
            self.trackers.close()


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# How the console names an eval record's numbers, in this order.
_EVAL_SHOWN = (
    ("eval_loss", "eval loss", ".4f"),
    ("eval_perplexity", "perplexity", ".4g"),
    ("eval_accuracy", "accuracy", ".4f"),
    ("eval_f1", "F1", ".4f"),
)


def describe_eval(results: Mapping[str, Any]) -> str:
    """ "eval loss 2.3026, perplexity 10 (over 1,024 labels)": an eval record's numbers for the console."""
    parts = [
        f"{name} {results[key]:{spec}}" for key, name, spec in _EVAL_SHOWN if results.get(key) is not None
    ]
    labels = results.get("eval_labels")
    return ", ".join(parts) + (f" (over {labels:,} labels)" if labels is not None else "")


class Console:
    """Rank 0's lines: one plain line per interval, and notes (events, evaluations).

    When the launcher draws the live bar (launcher.run.progress) it says so in MPLAUNCH_PROGRESS,
    and the per-interval lines are left out; notes are printed either way.
    """

    def __init__(self, plan: Plan) -> None:
        self.total = plan.recipe.train.max_steps
        self.fp16 = plan.precision.loss_scale is not None
        self.quiet = os.environ.get(progress.ENV) == progress.LAUNCHER

    def show(self, record: dict[str, Any]) -> None:
        if not self.quiet:
            print(progress.plain_line(record, self.total, self.fp16), flush=True)

    def note(self, message: str) -> None:
        print(message, flush=True)
