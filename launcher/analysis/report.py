"""`mplaunch report RUN_DIR [--out DIR]`: PNG plots and a summary table from a run's metrics.jsonl.

The run directory is read by launcher.rundir.metrics_log (finished, running, crashed and copied runs
alike); the plots are drawn by launcher.analysis.plots (`plot_loss` overlays the loss curves of
several runs), the LR of every step from the schedule in plan.json, and those a run has nothing for
(a loss scale without fp16, device memory on a CPU) left out with the reason in the summary; fp8
runs also get fp8.png, the fp8 casts' heatmap (launcher.analysis.fp8_plot). The wall time counts
from the launch (RUN_DIR/env.json) and the setup before the first step from the workers' "ready"
events. matplotlib (the `report` extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.analysis import fp8_range
from launcher.analysis.fp8_plot import FILE as FP8_FILE
from launcher.analysis.fp8_plot import fp8_xrays, plot_fp8
from launcher.analysis.plots import left_out, steady, write_plots
from launcher.plan import schedule
from launcher.plan.resume import SCHEDULE_INPUTS
from launcher.recipe.sections import Recipe
from launcher.rundir.layout import METRICS_FILE, RunDir
from launcher.rundir.metrics_log import (
    Metrics,
    format_duration,
    is_number,
    read_metrics,
    read_run_info,
    run_state,
)

# An eval record's task metrics (launcher.worker.evaluation), as the summary names them.
_EVAL_NAMES = {"eval_perplexity": "perplexity", "eval_accuracy": "accuracy", "eval_f1": "F1"}


@dataclass(frozen=True)
class Summary:
    """The numbers of the summary table; None where the run did not record them."""

    context: str
    state: str
    state_detail: str
    step: int
    max_steps: int | None
    final_loss: float | None
    best_eval: tuple[float, int] | None
    median_samples_per_s: float | None
    median_mfu: float | None
    skipped_steps: int
    checkpoints: tuple[int, ...]
    wall_s: float | None
    setup: Setup | None = None
    xrays: int = 0
    xray_warnings: tuple[str, ...] = ()  # the layers the precision x-ray's events named
    # The last evaluation's task metric (eval_perplexity, eval_accuracy, eval_f1) and its step.
    last_eval: tuple[dict[str, float], int] | None = None
    # The plots left out and why (launcher.analysis.plots.left_out): {file name: reason}.
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def overflow_rate(self) -> float | None:
        return self.skipped_steps / self.step if self.step else None

    def rows(self) -> list[tuple[str, str]]:
        def number(x: float | None, spec: str) -> str:
            return "n/a" if x is None else format(x, spec)

        rate, best, ckpts = self.overflow_rate, self.best_eval, self.checkpoints
        return [
            ("run", self.context),
            ("state", f"{self.state} ({self.state_detail})" if self.state_detail else self.state),
            ("steps", f"{self.step:,} of {'?' if self.max_steps is None else f'{self.max_steps:,}'}"),
            ("final loss", number(self.final_loss, ".4f")),
            ("best eval loss", f"{best[0]:.4f} at step {best[1]:,}" if best else "n/a"),
            ("last eval", self._last_eval()),
            ("median samples/s", number(self.median_samples_per_s, ",.1f")),
            ("median MFU", number(self.median_mfu, ".1%")),
            ("skipped steps", f"{self.skipped_steps:,}"),
            ("overflow rate", "n/a" if rate is None else f"{rate:.1%} of {self.step:,} steps"),
            ("checkpoints", f"{len(ckpts)} (latest step {ckpts[-1]:,})" if ckpts else "none"),
            ("wall time", self._wall()),
            ("setup", "n/a" if self.setup is None else self.setup.describe()),
            ("precision x-ray", self._xray()),
            *([("not plotted", "; ".join(why for _, why in self.left_out))] if self.left_out else []),
        ]

    def _wall(self) -> str:
        if self.wall_s is None:
            return "n/a"
        end = "finish" if self.state == "finished" else "the last record"
        if self.setup is None:
            return f"{format_duration(self.wall_s)} from the first record to {end}"
        since = "launch" if self.setup.from_launch else "the workers' start"
        return f"{format_duration(self.wall_s)} from {since} to {end}"

    def _last_eval(self) -> str:
        if self.last_eval is None or not self.last_eval[0]:
            return "n/a"
        shown = ", ".join(f"{_EVAL_NAMES[k]} {v:.4g}" for k, v in self.last_eval[0].items())
        return f"{shown} at step {self.last_eval[1]:,}"

    def _xray(self) -> str:
        if not self.xrays:
            return "none recorded"
        named = self.xray_warnings
        warned = f"warnings name {len(named)} layer{'s' * (len(named) != 1)} ({', '.join(named[:2])}{', ...' if len(named) > 2 else ''})"
        return f"{self.xrays} x-ray{'s' * (self.xrays != 1)}; " + (warned if named else "no warning")


@dataclass(frozen=True)
class Setup:
    """The time before training, over every launch of a run (a resume is a launch).

    Attributes:
        seconds: from each launch to its first step, summed.
        began: the first launch, Unix s.
        launches: how many.
        phases: the last launch's phases before its first step (the "ready" event's, and the
            launcher's own where its start is known).
        from_launch: whether `began` is the launcher's start, not its workers'.
    """

    seconds: float
    began: float
    launches: int
    phases: dict[str, float]
    from_launch: bool

    def describe(self) -> str:
        if self.launches > 1:
            return f"{format_duration(self.seconds)} before the first step, over {self.launches} launches"
        parts = ", ".join(f"{name} {s:.1f}s" for name, s in self.phases.items())
        return (
            f"{format_duration(self.seconds)} before step 1 ({parts})"
            if parts
            else format_duration(self.seconds)
        )


def setup_time(metrics: Metrics, launched: float | None = None) -> Setup | None:
    """When each launch began and how long it took to its first step, from the "ready" events
    (the workers' start and phases: launcher.run.progress.Phases); None before a first step.

    Args:
        launched: when the launcher started the latest launch (`launched_at`), if known; the
            launches before it count from their workers' start.
    """
    found: list[tuple[float, float, dict[str, float], bool]] = []  # (began, seconds, phases, launcher's)
    for ready in metrics.named("ready"):
        seconds: Any = ready.get("seconds")
        if not is_number(ready.get("time")) or not isinstance(seconds, dict):
            continue
        if not all(is_number(v) for v in seconds.values()):
            continue
        first = ready["time"] - float(seconds.get("first step", 0.0))  # when its first step began
        workers = ready["time"] - sum(seconds.values())
        phases = {k: float(v) for k, v in seconds.items() if k != "first step"}
        found.append((workers, first - workers, phases, False))
    if not found:
        return None
    found.sort()
    if launched is not None and launched <= found[-1][0]:
        workers, seconds, phases, _ = found[-1]
        found[-1] = (launched, seconds + workers - launched, {"launcher": workers - launched, **phases}, True)
    began, _, _, from_launch = found[0]
    return Setup(sum(f[1] for f in found), began, len(found), found[-1][2], from_launch)


def launched_at(run_dir: Path) -> float | None:
    """When the launcher prepared the run directory for its latest launch (RUN_DIR/env.json's time);
    None for a Slurm job's directory, prepared when the job was submitted, not when it started."""
    files = RunDir.of(run_dir)
    if files.slurm_script.exists():
        return None
    try:
        launched = json.loads(files.env_file.read_text()).get("time")
    except (OSError, ValueError, AttributeError):
        return None
    return float(launched) if is_number(launched) else None


def lr_schedule(run_dir: Path) -> Callable[[int], float] | None:
    """The run's LR schedule (launcher.plan.schedule.lr_at) from its plan.json, else its
    recipe.yaml; None when neither holds one this mplaunch reads."""
    files = RunDir.of(run_dir)
    try:
        recipe: Any = json.loads(files.plan_file.read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        try:
            import yaml

            recipe = yaml.safe_load(files.recipe_file.read_text())
        except (OSError, ValueError):
            return None
    try:
        only = Recipe.model_validate({"name": "report", **{k: recipe[k] for k in SCHEDULE_INPUTS}})
    except (KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    return lambda applied: schedule.lr_at(only, applied)


def summarize(run_dir: str | Path, metrics: Metrics, now: float | None = None) -> Summary:
    """The summary table of a run; `now` (unix s) decides whether a silent run is still running."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    state, detail = run_state(run_dir, metrics, now)
    _, losses = metrics.series("loss")
    eval_steps, eval_losses = metrics.series("eval_loss", "eval")
    best = min(zip(eval_losses, eval_steps, strict=True), default=None)
    last = metrics.eval[-1] if metrics.eval else None
    last_eval = (
        ({k: float(last[k]) for k in _EVAL_NAMES if is_number(last.get(k))}, last["step"]) if last else None
    )
    samples, mfu = steady(metrics.series("samples_per_s")), steady(metrics.series("mfu"))
    _, skipped = metrics.series("skipped_steps")
    times = metrics.times()
    setup = setup_time(metrics, launched_at(run_dir))
    began = min(times[:1] + ([setup.began] if setup else []), default=0.0)
    return Summary(
        context=info.context,
        state=state,
        state_detail=detail,
        step=metrics.train[-1]["step"] if metrics.train else metrics.last_step,
        max_steps=info.max_steps,
        final_loss=losses[-1] if losses else None,
        best_eval=best,
        median_samples_per_s=statistics.median(samples) if samples else None,
        median_mfu=statistics.median(mfu) if mfu else None,
        skipped_steps=int(skipped[-1]) if skipped else 0,
        checkpoints=tuple(RunDir.of(run_dir, info.checkpoint_dir).checkpoint_steps()),
        wall_s=times[-1] - began if times else None,
        setup=setup,
        xrays=len(metrics.precision),
        left_out=tuple(left_out(metrics, info.dtype, info.device).items()),
        last_eval=last_eval,
        xray_warnings=tuple(
            dict.fromkeys(
                n
                for e in (
                    *metrics.named("underflow"),
                    *metrics.named("lost_updates"),
                    *metrics.named(fp8_range.EVENT),
                )
                for n in e.get("layers") or {}
            )
        ),
    )


def print_summary(summary: Summary) -> None:
    """A rich table on a terminal, aligned plain text otherwise (pipes, logs, tests)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="mplaunch report", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for label, value in summary.rows():
            table.add_row(label, value)
        Console().print(table)
        return
    for label, value in summary.rows():
        print(f"{label:<18} {value}")


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """`mplaunch report`: write the run's plots into `out_dir` (default RUN_DIR/report) and print its
    summary table.

    Raises:
        UserError: RUN_DIR has no metrics, or matplotlib is not installed.
    """
    out_dir = RunDir.of(run_dir).report if out_dir is None else out_dir
    metrics = read_metrics(run_dir)
    summary = summarize(run_dir, metrics)
    skip = [name for name, _ in summary.left_out]
    paths = write_plots(metrics, out_dir, summary.context, lr_of=lr_schedule(run_dir), leave_out=skip)
    if read_run_info(run_dir).dtype == "fp8" or fp8_xrays(metrics):
        paths.append(plot_fp8(metrics, out_dir / FP8_FILE, summary.context))
    print_summary(summary)
    print(f"plots: {', '.join(p.name for p in paths)} in {out_dir}")
    if metrics.bad_lines:
        print(
            f"note: skipped {metrics.bad_lines} unreadable line(s) of {METRICS_FILE}"
            " (a half-written last line is normal for a running or killed run)",
            file=sys.stderr,
        )
    return paths
