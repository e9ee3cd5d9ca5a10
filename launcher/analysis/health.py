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

The precision x-ray's records (launcher.worker.xray, every logging.precision_every steps) are judged
by `xray`: an **underflow** event when, in fp16, a layer has at least UNDERFLOW_SHARE of its
nonzero gradient elements below fp16's smallest normal (or only zeros, beside such a layer or
in every layer: a gradient can be zero by construction), with the remedy that fits
the loss-scale settings and the largest gradient's headroom; a **lost_updates** event when
LOST_SHARE of a layer's updates leave its fp32 master weight unchanged, in any dtype; on fp8 runs an
**fp8_range** event when a layer's fp8 casts saturate or flush values to zero
(launcher.analysis.fp8_range).

The optimizer audit (launcher.worker.audit, at step 1 and at every checkpoint) records an
**optimizer_steps** event when an optimizer state's step counter is not the number of optimizer
steps taken, and an **optimizer_first_update** event when Adam's first update is not the +-lr per
element it promises (FIRST_UPDATE_TOLERANCE); both are built here (`step_counter_event`,
`first_update_event`), and `mplaunch parity` fails on either.

Light side: no torch. Whether the GPUs have bf16 is read from the plan's
precision policy, never probed again at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.analysis.fp8_range import Fp8Judge
from launcher.plan.resolve import Plan

# The precision x-ray's thresholds (launcher.worker.xray's records). A healthy fp16 run's layers show under 1 %
# of their gradient in fp16's subnormal range; a scale 2^32 too low, 100 %. Updates lost in the fp32
# master weights are judged only at a learning rate of at least LOST_MIN_LR of optimizer.lr (not at
# the start of warmup or the end of a decay, where a vanishing update is the schedule's intent).
UNDERFLOW_SHARE = 0.05
LOST_SHARE = 0.10
LOST_MIN_LR = 0.1
# The optimizer audit's events, and how far the median |update| / lr of Adam's first step may lie
# from the 1.0 it promises: fp32 rounding of the measured update moves it by under 1 % (elements
# where the update is below 2^7 ULPs of the weight are not measured); an optimizer one step ahead,
# as DeepSpeed's stage-0 16-bit optimizers left it, gives sqrt(1 + beta2) / (1 + beta1): 0.735 at
# betas 0.9/0.95, 0.744 at 0.9/0.999.
STEPS_EVENT, FIRST_UPDATE_EVENT = "optimizer_steps", "optimizer_first_update"
AUDIT_EVENTS = (STEPS_EVENT, FIRST_UPDATE_EVENT)
FIRST_UPDATE_TOLERANCE = 0.05


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
        # The precision x-ray's judge (`xray`).
        self.loss_scale = plan.precision.loss_scale
        self.bf16_anywhere = plan.precision.bf16_supported
        self.dtype = plan.precision.dtype
        self.peak_lr = plan.recipe.optimizer.lr
        self.underflowing: set[str] = set()
        self.losing: set[str] = set()
        fp8 = plan.precision.fp8
        self.fp8 = Fp8Judge(fp8.get("keep") or [], fp8.get("scaling", "tensorwise")) if fp8 else None

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

    def xray(self, step: int, seen: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """The events a precision x-ray record (launcher.worker.xray) calls for: (event, message, fields).

        Each names only layers not named by an earlier event of its kind, so a lasting problem is
        reported once per layer, not once per x-ray. A skipped step's gradients overflowed and are
        not judged.
        """
        if seen.get("skipped"):
            return []
        out = []
        rows: dict[str, dict[str, Any]] = seen["layers"]
        if self.active:
            under = {
                n: u
                for n, row in rows.items()
                if (u := underflow_share(row)) is not None and u >= UNDERFLOW_SHARE
            }
            if not _flushing(under, rows):
                under = {}
            if set(under) - self.underflowing:
                self.underflowing |= set(under)
                out.append(self._underflow(step, under, rows, seen["loss_scale"]))
        if seen["lr"] >= LOST_MIN_LR * self.peak_lr:
            lost = {n: row["lost"] for n, row in rows.items() if (row.get("lost") or 0) >= LOST_SHARE}
            if set(lost) - self.losing:
                self.losing |= set(lost)
                out.append(_lost(step, lost, seen["lr"], self.dtype))
        if self.fp8 is not None:
            out += self.fp8.judge(step, seen)
        return out

    def _underflow(
        self, step: int, under: dict[str, float], rows: dict[str, dict[str, Any]], scale: float
    ) -> tuple[str, str, dict[str, Any]]:
        flushed = [n for n in under if rows[n]["zero"] == 1]
        cause = (
            f"fp16 gradients underflow at loss scale {scale:g} in {len(under)} of {len(rows)} layers "
            f"({_names(under)}): that share of their nonzero gradient elements is below fp16's smallest normal "
            "2^-14, where precision is lost and below 2^-24 nothing is left"
        )
        if flushed:
            cause += f"; {len(flushed)} of them have only zero gradients (all flushed)"
        peaks = [row["headroom_log2"] for row in rows.values() if row.get("headroom_log2") is not None]
        room = (
            math.floor(min(peaks)) - 1 if peaks else None
        )  # doublings that keep the largest gradient 2x below 65504
        ls = self.loss_scale
        assert ls is not None  # only fp16 runs judge underflow
        if room is not None and room >= 1 and not ls.dynamic:
            remedy = (
                "set precision.loss_scale.dynamic=true, which raises the scale while the gradients fit, or raise "
                f"precision.loss_scale.initial to {scale * 2.0**room:g} (the largest gradient is 2^{room + 1} "
                "below fp16's maximum)"
            )
        elif room is not None and room >= 1:
            remedy = (
                f"raise precision.loss_scale.initial (or .min) toward {scale * 2.0**room:g}, or lower "
                "precision.loss_scale.window so the scale rises sooner"
            )
        else:
            biggest = min(rows, key=lambda n: rows[n].get("headroom_log2") or math.inf)
            remedy = (
                f"the scale cannot rise: the gradients of {biggest} are near fp16's maximum; keep the "
                "underflowing layers in fp32 (autocast off around them in the model's code)"
            )
        if self.bf16_anywhere:
            remedy += "; or precision.dtype=bf16, which has fp32's range and needs no loss scale"
        message = f"warning: step {step}: {cause}. Fix: {remedy}"
        return "underflow", message, {"layers": under, "loss_scale": scale, "cause": cause, "remedy": remedy}


def _flushing(under: dict[str, float], rows: dict[str, dict[str, Any]]) -> bool:
    """Whether layers whose gradient is all zero count as flushed by fp16.

    A gradient can be exactly zero by construction (a LoRA A matrix's, while B is still all zeros),
    so all-zero layers count only beside a layer whose nonzero gradient underflows too, or when
    every layer is all zero (no model is made so).
    """
    measured = [row for row in rows.values() if row.get("elements")]
    partial = [n for n in under if rows[n]["zero"] != 1]
    return bool(partial) or (bool(measured) and all(row["zero"] == 1 for row in measured))


def underflow_share(row: dict[str, Any]) -> float | None:
    """The share of a layer's gradient that fp16 underflows: its nonzero elements below 2^-14, or all
    of it when every element is zero (None without fp16 columns or elements)."""
    if "underflow" not in row or not row["elements"]:
        return None
    return 1.0 if row["zero"] == 1 else row["underflow"]


def _lost(step: int, lost: dict[str, float], lr: float, dtype: str) -> tuple[str, str, dict[str, Any]]:
    cause = (
        f"updates vanish to rounding in {len(lost)} layers ({_names(lost)}): at lr {lr:g} that share of their "
        "updates is below half the last bit of their fp32 master weight (about |w| * 2^-24), so the weight "
        "does not change at all"
    )
    if dtype != "fp32":
        cause += f" (fp32 master weights keep every update too small for {dtype}, but not these)"
    remedy = (
        "raise optimizer.lr, or check that these weights have not grown large (weight decay, initialisation)"
    )
    message = f"warning: step {step}: {cause}. Fix: {remedy}"
    return "lost_updates", message, {"layers": lost, "lr": lr, "cause": cause, "remedy": remedy}


def step_counter_event(
    step: int, expected: int, counters: dict[int, int], setup: str
) -> tuple[str, str, dict[str, Any]]:
    """The audit's event for optimizer states whose step counters are not `expected` (the optimizer
    steps taken by `step`, skipped fp16 steps not counted); `counters`: counter -> states holding it;
    `setup`: the run's settings that choose the optimizer (backend, zero.stage, precision.dtype)."""
    found = ", ".join(f"{n} state{'s' if n > 1 else ''} at {c}" for c, n in sorted(counters.items()))
    taken = (
        f"the optimizer's step counters are not the {expected} optimizer steps taken by step {step} ({found})"
    )
    if any(c > expected for c in counters):
        cause = (
            f"{taken}: the optimizer took steps the run did not (DeepSpeed's stage-0 fp16/bf16 optimizer steps "
            "once on zero gradients when it is built, or an optimizer stepped on a step reported skipped), so "
            "Adam's bias correction runs ahead and every update differs from a reference run's"
        )
        remedy = (
            "if this run resumed a checkpoint written before mplaunch undid DeepSpeed's pre-step, train it again "
            f"from step 0; otherwise report it with the run's settings ({setup})"
        )
    else:
        cause = f"{taken}: some parameters got no gradient in some steps, or the optimizer skipped steps unreported"
        remedy = f"freeze the parameters that get no gradient, or report it with the run's settings ({setup})"
    message = f"warning: step {step}: optimizer audit: {cause}. Fix: {remedy}"
    fields = {"expected": expected, "counters": {str(c): n for c, n in counters.items()}}
    return STEPS_EVENT, message, {**fields, "cause": cause, "remedy": remedy}


def first_update_event(
    ratio: float, elements: int, lr: float, betas: tuple[float, float], setup: str
) -> tuple[str, str, dict[str, Any]] | None:
    """The audit's event when the median |update| / lr of Adam's first step, over `elements` sampled
    fp32 master weights (weight decay's share left out), is not the 1.0 Adam promises; None when it is."""
    if abs(ratio - 1.0) <= FIRST_UPDATE_TOLERANCE:
        return None
    ahead = math.sqrt(1 + betas[1]) / (1 + betas[0])  # the first update of an Adam one step ahead
    cause = (
        f"Adam's first update moved the fp32 master weights by {ratio:.3f} x lr (median of {elements} sampled "
        f"elements, lr {lr:g}) where its bias correction promises 1.0 x lr; an optimizer one step ahead "
        f"(moments or step counter not starting from zero) moves {ahead:.3f} x lr at betas {betas[0]:g}/{betas[1]:g}"
    )
    remedy = f"report it with the run's settings ({setup}) and optimizer settings"
    message = f"warning: step 1: optimizer audit: {cause}. Fix: {remedy}"
    fields = {"ratio": ratio, "elements": elements, "lr": lr}
    return FIRST_UPDATE_EVENT, message, {**fields, "cause": cause, "remedy": remedy}


def _names(shares: dict[str, float], most: int = 4) -> str:
    ranked = sorted(shares, key=lambda n: -shares[n])
    named = ", ".join(f"{n} {shares[n]:.0%}" for n in ranked[:most])
    return named + (f" and {len(ranked) - most} more" if len(ranked) > most else "")


def initial_search_steps(plan: Plan) -> int:
    """Most steps a dynamic scaler can skip walking down from its initial scale to its minimum."""
    ls = plan.precision.loss_scale
    if ls is None or not ls.dynamic or ls.initial <= ls.min:
        return 0
    return ls.hysteresis * math.ceil(math.log2(ls.initial / ls.min))


def _scale(scale: float | None) -> str:
    return "n/a" if scale is None else f"{scale:g}"
