"""How far a mixed-precision run lies from its reference twin (fp32; bf16 for fp8): losses per step,
at the end, speed, per layer.

`compare` takes the two runs' metrics (launcher.rundir.metrics_log) and is pure:

* per step, |mixed - fp32| / |fp32|: its median and maximum;
* the final difference: the relative difference of the two mean losses over the
  last 10 % of the steps (at least one); per-step differences are dominated by
  rounding noise, which partly cancels in the mean, while a real problem (such
  as fp16 gradients underflowing) makes the mixed run train slower, a gap that
  grows with the steps;
* the speed ratio: median samples/s of the mixed run over that of the fp32 run.

The verdict is PASS when both runs complete, the final difference is at most
the tolerance, neither run recorded an optimizer audit event (launcher.worker.audit) and the
mixed run recorded no fp8_range event (launcher.analysis.fp8_range: its fp8 casts lose values).
Skipped fp16 steps log no loss; they are left out and counted.
`attribution` says where the runs differ: the gradient of step 1 (the same weights and batch
in both) layer by layer, from the precision x-ray's sketches (launcher.worker.xray.sketch).
launcher.analysis.parity runs the two trainings and holds the measured default tolerance.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from launcher.analysis import fp8_range
from launcher.analysis.health import AUDIT_EVENTS
from launcher.rundir.metrics_log import Metrics

FINAL_FRACTION = 0.10


@dataclass(frozen=True)
class Comparison:
    """The numbers of one parity check; differences are fractions (0.01 is 1 %)."""

    dtype: str
    steps: int
    compared_steps: int
    skipped_steps: int
    median_rel_diff: float | None
    max_rel_diff: float | None
    max_rel_diff_step: int | None
    final_rel_diff: float | None
    final_window: int
    final_loss_fp32: float | None
    final_loss_mixed: float | None
    samples_per_s_fp32: float | None
    samples_per_s_mixed: float | None
    tolerance: float
    problems: tuple[str, ...] = ()
    reference: str = "fp32"  # the reference run's dtype: bf16 for fp8, else fp32

    @property
    def speed_ratio(self) -> float | None:
        if not self.samples_per_s_fp32 or self.samples_per_s_mixed is None:
            return None
        return self.samples_per_s_mixed / self.samples_per_s_fp32

    @property
    def passed(self) -> bool:
        return not self.problems and self.final_rel_diff is not None and self.final_rel_diff <= self.tolerance

    def lines(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2%}"

        def rate(x: float | None) -> str:
            return "n/a" if x is None else f"{x:,.1f}"

        ratio = self.speed_ratio
        out = [
            f"steps compared       {self.compared_steps} of {self.steps}"
            + (f" ({self.skipped_steps} skipped fp16 steps left out)" if self.skipped_steps else ""),
            f"per-step difference  median {pct(self.median_rel_diff)}, max {pct(self.max_rel_diff)}"
            + (f" at step {self.max_rel_diff_step}" if self.max_rel_diff_step is not None else ""),
            f"final difference     {pct(self.final_rel_diff)} "
            f"(mean loss over the last {self.final_window} steps: "
            f"{self.reference} {_num(self.final_loss_fp32)}, {self.dtype} {_num(self.final_loss_mixed)}); "
            f"tolerance {pct(self.tolerance)}",
            f"speed                {self.dtype} {rate(self.samples_per_s_mixed)} samples/s, "
            f"{self.reference} {rate(self.samples_per_s_fp32)} samples/s: "
            + ("n/a" if ratio is None else f"{ratio:.2f}x"),
        ]
        out += [f"problem              {p}" for p in self.problems]
        verdict = "PASS" if self.passed else "FAIL"
        why = (
            ""
            if self.passed
            else ": " + (self.problems[0] if self.problems else "final difference over tolerance")
        )
        return [*out, f"{verdict}: {self.dtype} vs {self.reference}{why}"]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def compare(
    fp32: Metrics, mixed: Metrics, dtype: str, steps: int, tolerance: float, reference: str = "fp32"
) -> Comparison:
    """Compare the per-step losses of the reference (`fp32`, of dtype `reference`) and mixed runs
    (pure; see the module docstring)."""
    ref = _losses(fp32)
    got = _losses(mixed)
    logged = {r["step"] for r in mixed.train}
    skipped = sum(1 for s in logged if s in ref and s not in got)
    common = sorted(s for s in ref if s in got)
    problems = []
    if max(logged, default=0) < steps:
        problems.append(f"the {dtype} run logged {max(logged, default=0)} of {steps} steps")
    if max(ref, default=0) < steps:
        problems.append(f"the {reference} run logged {max(ref, default=0)} of {steps} steps")
    diffs = [abs(got[s] - ref[s]) / abs(ref[s]) for s in common if ref[s] != 0]
    window = common[-max(1, math.ceil(FINAL_FRACTION * len(common))) :] if common else []
    final_ref = statistics.fmean(ref[s] for s in window) if window else None
    final_got = statistics.fmean(got[s] for s in window) if window else None
    final = abs(final_got - final_ref) / abs(final_ref) if final_ref and final_got is not None else None
    if final is None:
        problems.append("no step has a loss in both runs")
    problems += audit_problems({reference: fp32, dtype: mixed})
    problems += range_problems(dtype, mixed)
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
    return Comparison(
        dtype=dtype,
        steps=steps,
        compared_steps=len(common),
        skipped_steps=skipped,
        median_rel_diff=statistics.median(diffs) if diffs else None,
        max_rel_diff=diffs[worst] if worst is not None else None,
        max_rel_diff_step=[s for s in common if ref[s] != 0][worst] if worst is not None else None,
        final_rel_diff=final,
        final_window=len(window),
        final_loss_fp32=final_ref,
        final_loss_mixed=final_got,
        samples_per_s_fp32=_median(fp32, "samples_per_s"),
        samples_per_s_mixed=_median(mixed, "samples_per_s"),
        tolerance=tolerance,
        problems=tuple(problems),
        reference=reference,
    )


def audit_problems(runs: dict[str, Metrics]) -> list[str]:
    """One problem per optimizer audit event (launcher.worker.audit) in each run: an optimizer that
    counts or moves other than the steps taken fails parity however close the losses are."""
    return [
        f"optimizer audit of the {name} run, step {e.get('step')}: {e.get('cause') or e.get('message')}"
        for name, metrics in runs.items()
        for e in metrics.events
        if e.get("event") in AUDIT_EVENTS
    ]


def range_problems(dtype: str, mixed: Metrics) -> list[str]:
    """One problem per fp8_range event of the mixed run: layers whose fp8 casts saturate or flush
    values to zero fail parity however close the losses are, with the override that keeps them."""
    return [
        f"fp8 x-ray of the {dtype} run, step {e.get('step')}: {e.get('cause') or e.get('message')}; "
        f"{e.get('remedy', '')}".rstrip("; ")
        for e in mixed.events
        if e.get("event") == fp8_range.EVENT
    ]


@dataclass(frozen=True)
class LayerDiff:
    """How one layer's gradient at step 1 in the mixed run differs from the fp32 run's.

    Attributes:
        layer: the module (launcher.worker.xray.layer_of).
        rel_diff: |g_mixed - g_fp32| / |g_fp32|, estimated from the x-ray's sketches (about +-25 %).
        norm_ratio: |g_mixed| / |g_fp32| (exact): well below 1 where fp16 flushed gradients to zero.
    """

    layer: str
    rel_diff: float
    norm_ratio: float | None


def attribution(fp32: Metrics, mixed: Metrics) -> tuple[list[LayerDiff], str | None]:
    """Layers by how much their gradients differ between the runs at step 1, largest first.

    Step 1 is the one step both runs take from the same weights on the same batch; the x-ray
    sketches every layer's gradient there. Returns the layers and, when there are none, why.
    """
    first = [next((r for r in m.precision if r["step"] == 1), None) for m in (fp32, mixed)]
    if first[0] is None or first[1] is None:
        return [], "no precision x-ray of step 1 in both runs (logging.precision_every was 0?)"
    if first[1].get("skipped"):
        return [], "the mixed run's step 1 overflowed in fp16 and was skipped"
    out = []
    for name, ref in first[0]["layers"].items():
        got = first[1]["layers"].get(name) or {}
        a, b = ref.get("sketch"), got.get("sketch")
        size = math.dist(a, [0.0] * len(a)) if a else 0.0
        if not a or not b or size == 0:
            continue
        norms = ref.get("grad_norm"), got.get("grad_norm")
        ratio = norms[1] / norms[0] if norms[0] and norms[1] is not None else None
        out.append(LayerDiff(name, math.dist(a, b) / size, ratio))
    if not out:
        return (
            [],
            "the x-ray of step 1 has no gradient sketches (x-ray off, or no layer with gradients in both runs)",
        )
    return sorted(out, key=lambda d: -d.rel_diff), None


def _losses(metrics: Metrics) -> dict[int, float]:
    # A skipped fp16 step logs NaN (its overflowed loss says nothing about training).
    steps, values = metrics.series("loss")
    return {s: v for s, v in zip(steps, values, strict=True) if math.isfinite(v)}


def _median(metrics: Metrics, key: str) -> float | None:
    _, values = metrics.series(key)
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else None
