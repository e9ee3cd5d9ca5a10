"""The optimizer audit: does the optimizer count and move as many steps as the run took?

Part of the precision x-ray's world, on every backend. Two checks, each reported as an event
(launcher.analysis.health builds its message, cause and remedy) that makes `mplaunch parity` fail:

* **step counters** (`optimizer_steps`), at step 1 and at every checkpoint: every optimizer state's
  `step` equals the optimizer steps taken (the steps so far less those the backend reports skipped:
  an fp16 step whose gradients overflowed moves no weight and no counter);
* **the first update** (`optimizer_first_update`), at step 1 of a fresh run: Adam's bias-corrected
  first update is g / (|g| + eps), +-1 per element where |g| is far above eps, so |delta w| / lr of
  the fp32 master weights, weight decay's share (AdamW's w * lr * wd) left out, has a median of 1.0.
  An optimizer one step ahead (DeepSpeed's stage-0 fp16/bf16 optimizers step once on zero
  gradients when built) gives sqrt(1 + beta2) / (1 + beta1), 0.735 at betas 0.9/0.95. Not judged
  where step 1's lr is 0 (scheduler.warmup_style hf) or the step was skipped.

Both read the backend's torch optimizer over the fp32 master weights (`torch_optimizer`, its
state) and this rank's masters with their param groups (`fp32_masters`): Accelerate's AdamW over
the model's fp32 parameters (FSDP2's DTensors, whose moments are DTensors too: each rank reads
its local shard), DeepSpeed's over its fp32 copies (stage 0 in 16 bits),
flat partitions (ZeRO 1-2) or partitioned groups (ZeRO-3). Reading counters and samples syncs the
host, which is why the audit runs only at step 1 and at checkpoints; each rank judges its own
states (every rank steps alike) and rank 0 records.

`fresh_state` is the fix the audit was written to catch: the DeepSpeed backend calls it where
DeepSpeed stepped the optimizer before training, before any checkpoint is loaded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from launcher.analysis.health import first_update_event, step_counter_event
from launcher.plan.resolve import Plan
from launcher.worker.backends import Backend
from launcher.worker.metrics import Meter

Event = tuple[str, str, dict[str, Any]]
SAMPLE = 4096  # elements per parameter whose first update is measured
# An element's first update is measured where it is at least 2^7 fp32 ULPs of its weight (|w| * 2^-23
# each; so rounding moves the ratio by under 1 %) and its gradient is at least this many eps (Adam's
# promise is then 1.0 to 1e-3).
MIN_ULPS_LOG2 = 7
MIN_GRAD_EPS = 1000.0
MIN_ELEMENTS = 16  # fewer measurable elements than this: the first update is not judged


def fresh_state(optimizer: torch.optim.Optimizer) -> int:
    """Return the optimizer's per-parameter state to that of an optimizer that never stepped:
    `step` 0 and every moment zero, in place (allocations and devices kept). Returns how many
    states held a nonzero step counter."""
    reset = 0
    for group in optimizer.param_groups:  # DeepSpeed's FusedAdam counts per group too
        if group.get("step"):
            reset, group["step"] = reset + 1, 0
    reset += sum(1 for c in _counters(optimizer) if c)
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step":
                state[key] = type(value)(0)
    return reset


def record_counters(backend: Backend, step: int, meter: Meter) -> None:
    """Record the audit's event, if any, for step counters that are not the optimizer steps taken
    by `step` (rank 0 records; every rank may call it)."""
    for event, message, fields in counter_events(
        backend.torch_optimizer(), step, backend.skipped_steps(), meter.plan
    ):
        meter.event(step, event, message, **fields)


def counter_events(
    optimizer: torch.optim.Optimizer | None, step: int, skipped: int, plan: Plan
) -> list[Event]:
    """The audit's event, if any, for step counters that are not `step - skipped` after `step`."""
    if optimizer is None:
        return []
    expected = step - skipped
    counts = Counter(_counters(optimizer))
    if set(counts) <= {expected}:
        return []
    return [step_counter_event(step, expected, dict(counts), setup(plan))]


def setup(plan: Plan) -> str:
    """The settings that choose the optimizer's wrapper, as a user would set them."""
    r = plan.recipe
    return f"backend={r.backend} zero.stage={r.zero.stage} precision.dtype={plan.precision.dtype}"


def _counters(optimizer: torch.optim.Optimizer) -> list[int]:
    """Every state's step counter, read with one host sync (fused AdamW keeps them on the GPU)."""
    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    on_device = [t.reshape(()).double() for t in steps if isinstance(t, torch.Tensor)]
    numbers = [int(c) for c in steps if isinstance(c, (int, float))]
    if on_device:  # on their devices: move them to one before stacking
        numbers += [int(c) for c in torch.stack([t.to(on_device[0].device) for t in on_device]).tolist()]
    return numbers


class FirstUpdate:
    """Samples the fp32 master weights before step 1 (construct it then), and judges the update
    step 1 made and its step counters after it (`record`).
    """

    def __init__(self, backend: Backend) -> None:
        self.optimizer = backend.torch_optimizer()
        self.before: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor, float]] = []
        for p, group in backend.fp32_masters():
            flat = _local(p.detach()).reshape(-1)
            if flat.numel():
                self.before.append((p, group, _sample(flat).double().clone(), float(group["lr"])))

    def record(self, backend: Backend, meter: Meter) -> None:
        """After step 1: record the audit's events (rank 0 records; every rank may call it)."""
        for event, message, fields in self.events(backend.skipped_steps(), meter.plan):
            meter.event(1, event, message, **fields)

    def events(self, skipped: int, plan: Plan) -> list[Event]:
        """The audit's events for step 1's counters and update (an fp16 step the loss scaler
        skipped moved nothing, so only its counters are judged)."""
        out = counter_events(self.optimizer, 1, skipped, plan)
        if self.optimizer is None or skipped:
            return out
        ratios, lr = self.ratios()
        if len(ratios) >= MIN_ELEMENTS and lr > 0:
            betas = tuple(self.optimizer.param_groups[0]["betas"])
            event = first_update_event(float(ratios.median()), len(ratios), lr, betas, setup(plan))
            out += [event] if event is not None else []
        return out

    def ratios(self) -> tuple[torch.Tensor, float]:
        """|delta w| / lr of the measurable sampled elements (weight decay's share left out), and the lr."""
        assert self.optimizer is not None
        decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(
            getattr(self.optimizer, "adam_w_mode", False)
        )
        out, lr_seen = [], 0.0
        for p, group, w0, lr in self.before:
            state = self.optimizer.state.get(p) or {}
            if lr <= 0 or "exp_avg" not in state:
                continue
            lr_seen = lr
            w1 = _sample(_local(p.detach()).reshape(-1)).double()
            grad = _sample(_local(state["exp_avg"]).reshape(-1)).double().abs() / (1.0 - group["betas"][0])
            decay = lr * group.get("weight_decay", 0.0) if decoupled else 0.0
            ratio = (w0 * (1.0 - decay) - w1.to(w0.device)).abs() / lr
            keep = (grad.to(w0.device) >= MIN_GRAD_EPS * group["eps"]) & (
                w0.abs() * 2.0 ** (MIN_ULPS_LOG2 - 23) <= lr
            )
            out.append(ratio[keep].cpu())
        return (torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)), lr_seen


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (reading it needs no collective); other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def _sample(flat: torch.Tensor) -> torch.Tensor:
    """At most SAMPLE evenly spaced elements of a 1-D tensor (a view)."""
    return flat[:: max(1, -(-flat.numel() // SAMPLE))]
