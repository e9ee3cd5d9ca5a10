"""Precision health: warnings about fp16 loss scaling while a run trains.

Rank 0 calls `PrecisionHealth(plan).check(record)` once per log interval with
that interval's train record (the metrics.jsonl fields) and shows what it
returns. Only fp16 runs can warn; bf16 and fp32 have no loss scale.

Three warnings:

* **overflow**: more than `overflow_threshold` (5 %) of the steps were skipped
  because fp16 gradients overflowed.
* **falling scale**: the loss scale fell in each of the last `falling_checks`
  (3) checks: the gradients keep growing toward fp16's limit, and the run stops
  once the scale reaches precision.loss_scale.min.
* **bf16 would be better**: either of the above, in fp16 on GPUs that all
  support bf16 (Ampere or newer). Given once per run.

A healthy dynamic scaler overflows on purpose: it starts high and halves until
the gradients fit (the first `hysteresis x log2(initial / min)` steps at most),
then probes a doubled scale after every `window` clean steps, skipping a step or
two each time. So the first of those steps are not judged, and steps are judged
in blocks of at least `block_steps` (50) steps, one or more log intervals: a
single skip in a 10-step interval would read as a 10 % overflow rate. Each
check warns at most once per kind, so a warning repeats at most once per block
while the problem lasts, never once per step.

Light side: no torch. Whether the GPUs have bf16 is read from the plan's
precision policy, never probed again at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.plan import Plan


@dataclass(frozen=True)
class _Mark:
    """Where the block being judged began."""

    step: int
    skipped: int
    scale: float | None


class PrecisionHealth:
    """Judges fp16 loss-scale behaviour from the per-interval train records.

    Args:
        plan: the run's plan (dtype, device, loss-scale settings).
        overflow_threshold: skipped fraction of a block's steps above which to warn.
        block_steps: fewest steps judged together.
        falling_checks: consecutive blocks with a falling scale before warning.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        overflow_threshold: float = 0.05,
        block_steps: int = 50,
        falling_checks: int = 3,
    ) -> None:
        self.active = plan.precision.loss_scale is not None
        self.overflow_threshold = overflow_threshold
        self.block_steps = block_steps
        self.falling_checks = falling_checks
        self.grace_steps = initial_search_steps(plan) if self.active else 0
        # The plan decided bf16 support for the hardware it runs on; a CPU run has no GPUs to advise on.
        self.bf16_available = self.active and plan.device == "cuda" and plan.precision.bf16_supported
        self.mark: _Mark | None = None
        self.falls = 0
        self.advised_bf16 = False

    def check(self, record: dict[str, Any]) -> list[str]:
        """The warnings for this interval's train record (usually none)."""
        if not self.active or record.get("kind") != "train":
            return []
        step, skipped, scale = record["step"], int(record.get("skipped_steps") or 0), record.get("loss_scale")
        here = _Mark(step, skipped, scale)
        if self.mark is None:
            if step >= self.grace_steps:
                self.mark = here
            return []
        span = step - self.mark.step
        if span < self.block_steps:
            return []
        start, self.mark = self.mark, here
        out = []
        overflows = skipped - start.skipped
        if overflows / span > self.overflow_threshold:
            out.append(
                f"step {step}: {overflows} of the last {span} steps overflowed in fp16 and were skipped "
                f"({overflows / span:.0%}); loss scale now {_scale(scale)}"
            )
        fell = scale is not None and start.scale is not None and scale < start.scale
        self.falls = self.falls + 1 if fell else 0
        if self.falls >= self.falling_checks:
            out.append(
                f"step {step}: the fp16 loss scale keeps falling ({self.falls} checks in a row, "
                f"now {_scale(scale)}): gradients are growing toward fp16's range; "
                "the run stops if it reaches precision.loss_scale.min"
            )
        if out and self.bf16_available and not self.advised_bf16:
            self.advised_bf16 = True
            out.append(
                "every GPU here supports bf16, which has fp32's range and needs no loss scaling: "
                "precision.dtype=bf16 avoids these overflows at the same speed"
            )
        return out


def initial_search_steps(plan: Plan) -> int:
    """Most steps a dynamic scaler can skip walking down from its initial scale to its minimum."""
    ls = plan.precision.loss_scale
    if ls is None or not ls.dynamic or ls.initial <= ls.min:
        return 0
    return ls.hysteresis * math.ceil(math.log2(ls.initial / ls.min))


def _scale(scale: float | None) -> str:
    return "n/a" if scale is None else f"{scale:g}"
