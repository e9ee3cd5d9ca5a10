"""The PNG plots of `mplaunch report` and `mplaunch parity`, drawn from a run's Metrics
(launcher.rundir.metrics_log): what each figure shows. The canvas they are drawn on, and
the matplotlib import it delays, are launcher.analysis.figure's.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from launcher.analysis import figure
from launcher.analysis.health import LOST_SHARE, UNDERFLOW_SHARE
from launcher.errors import UserError
from launcher.rundir.metrics_log import Metrics, is_number

GIB = 1024**3


def plot_loss(curves: Mapping[str, Metrics], path: Path, *, title: str = "Loss", context: str = "") -> Path:
    """Train loss (line) and eval loss (dashed, dots) of one or more runs, resume points as dotted lines.

    Args:
        curves: label -> metrics; "" for a single unlabelled run. The parity check overlays two runs:
            plot_loss({"fp32": read_metrics(a), "bf16": read_metrics(b)}, out / "loss.png").
        path: the PNG to write.
    """
    fig, axes = figure.new_figure()
    ax = axes[0]
    single = len(curves) == 1
    for i, (label, metrics) in enumerate(curves.items()):
        prefix = f"{label} " if label else ""
        steps, loss = metrics.series("loss")
        eval_steps, eval_loss = metrics.series("eval_loss", "eval")
        color = f"C{i}"
        ax.plot(steps, loss, color=color, lw=1.4, label=f"{prefix}train loss")
        if eval_steps:
            style: dict[str, Any] = {"ls": "--", "marker": "o", "ms": 4, "lw": 1}
            ax.plot(
                eval_steps, eval_loss, color="C1" if single else color, **style, label=f"{prefix}eval loss"
            )
        for j, step in enumerate(metrics.resumes):
            mark: str | None = f"{prefix}resumed from checkpoint" if j == 0 else None
            ax.axvline(step, color="0.4" if single else color, ls=":", lw=1.5, label=mark)
        for j, error in enumerate(metrics.named("error")):
            mark = f"{prefix}error (crash)" if j == 0 else None
            ax.axvline(error["step"], color="C3", ls="--", lw=1.2, alpha=0.7, label=mark)
    if not any(m.series("loss")[0] for m in curves.values()):
        figure.note(ax, "no training step logged yet")
    ax.set_ylabel("loss")
    figure.legend(ax)
    return figure.finish(fig, axes, path, title, context)


def lr_curve(metrics: Metrics, lr_of: Callable[[int], float]) -> tuple[list[int], list[float]]:
    """The learning rate of every step, from the run's schedule (launcher.plan.schedule), where it
    agrees with the logged records.

    Step s used lr_of(s - 1 - the skipped fp16 steps before it: the "overflow" events). A logged
    lr the schedule does not give (a resume that changed the schedule; an fp16 run from before
    overflow events) leaves the schedule out up to the resume after it, or wholly without one.

    Args:
        lr_of: the lr after n applied optimizer steps, as the run's plan.json schedules it.
    """
    skips = sorted(e["step"] for e in metrics.named("overflow"))

    def at(step: int) -> float:
        return lr_of(step - 1 - bisect.bisect_left(skips, step))

    steps, logged = metrics.series("lr")
    wrong = [
        s
        for s, v in zip(steps, logged, strict=True)
        if not math.isclose(at(s), v, rel_tol=1e-6, abs_tol=1e-15)
    ]
    begin = 1
    if wrong:
        later = [r for r in metrics.resumes if r >= wrong[-1]]
        if not later:
            return [], []
        begin = later[0] + 1
    end = metrics.last_step
    # Every step up to 20,000 points; a longer run's curve is sampled (it is smooth past warmup).
    xs = [*range(begin, end + 1, max(1, (end - begin) // 20_000))]
    xs += [end] if xs and xs[-1] != end else []
    return xs, [at(s) for s in xs]


def _plot_lr(metrics: Metrics, path: Path, context: str, lr_of: Callable[[int], float] | None) -> Path:
    from matplotlib.ticker import ScalarFormatter

    fig, axes = figure.new_figure()
    ax = axes[0]
    steps, lr = metrics.series("lr")
    curve = lr_curve(metrics, lr_of) if lr_of is not None and steps else ([], [])
    if curve[0]:
        ax.plot(*curve, color="C0", lw=1.5, label="every step (the run's schedule)")
        ax.plot(steps, lr, "o", color="C1", ms=3.5, label="logged (metrics.jsonl)")
        figure.legend(ax)
    else:
        ax.plot(steps, lr, color="C0", lw=1.5)
    if not steps:
        figure.note(ax, "no learning rate logged yet")
    formatter = ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-2, 3))
    ax.yaxis.set_major_formatter(formatter)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("learning rate")
    return figure.finish(fig, axes, path, "Learning rate", context)


def _times(factor: float) -> Any:
    """x -> x * factor, for a secondary axis (matplotlib passes arrays)."""

    def scale(x: Any) -> Any:
        return x * factor

    return scale


def _scale_at(steps: list[int], scales: list[float], step: int) -> float:
    return scales[max(bisect.bisect_right(steps, step) - 1, 0)]


def _plot_loss_scale(metrics: Metrics, path: Path, context: str) -> Path:
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig, axes = figure.new_figure()
    ax = axes[0]
    steps, scales = metrics.series("loss_scale")
    skip_steps, skipped = metrics.series("skipped_steps")
    if not steps:
        figure.note(ax, "no loss scale recorded yet")
        return figure.finish(fig, axes, path, "Loss scale", context)
    ax.step(steps, scales, where="post", color="C0", lw=1.6, label="loss scale")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("loss scale (log2 axis)")
    # Mark the steps the scaler skipped: overflow events when logged, else the intervals where the
    # cumulative skipped_steps counter went up.
    overflows = [(e["step"], e.get("loss_scale")) for e in metrics.named("overflow")]
    if overflows:
        marks = [
            (s, float(v) if v is not None and is_number(v) else _scale_at(steps, scales, s))
            for s, v in overflows
        ]
        label = f"overflow, step skipped ({len(marks)})"
    else:
        went_up = [s for s, a, b in zip(skip_steps[1:], skipped, skipped[1:], strict=False) if b > a]
        marks = [(s, _scale_at(steps, scales, s)) for s in went_up]
        label = "interval with skipped steps"
    if marks:
        ax.plot([s for s, _ in marks], [v for _, v in marks], "x", color="C3", ms=8, mew=2, label=label)
    shown = [*scales, *(v for _, v in marks)]
    ax.set_ylim(min(shown) / 4, max(shown) * 4)
    twin = ax.twinx()
    twin.step(skip_steps, skipped, where="post", color="C1", lw=1.2, alpha=0.8, label="skipped steps (total)")
    twin.set_ylabel("skipped steps (total)")
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    twin.set_ylim(bottom=0, top=max([*skipped, 1]) * 1.15)
    figure.legend(ax, twin)
    return figure.finish(fig, axes, path, "Loss scale and skipped steps", context)


def _constant_ratio(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> float | None:
    """b / a when it is the same at every shared step (tokens/s = samples/s x tokens per sample)."""
    a_at = dict(zip(*a, strict=True))
    ratios = [v / a_at[s] for s, v in zip(*b, strict=True) if a_at.get(s)]
    if ratios and max(ratios) - min(ratios) <= 1e-3 * abs(statistics.mean(ratios)):
        return statistics.mean(ratios)
    return None


def steady(series: tuple[list[int], list[float]]) -> list[float]:
    """A throughput series' values less step 1's when there are others: step 1 is logged alone
    (launcher.worker.metrics), and its time holds the first step's one-time costs."""
    steps, values = series
    return [v for s, v in zip(steps, values, strict=True) if s != 1] or values


def _plot_throughput(metrics: Metrics, path: Path, context: str) -> Path:
    from matplotlib.ticker import PercentFormatter

    samples, tokens, mfu = (metrics.series(k) for k in ("samples_per_s", "tokens_per_s", "mfu"))
    fig, axes = figure.new_figure(2, 5.5) if mfu[0] else figure.new_figure()
    ax = axes[0]
    if not samples[0]:
        figure.note(ax, "no throughput logged yet")
        return figure.finish(fig, axes, path, "Throughput", context)
    median = statistics.median(steady(samples))
    ax.plot(*samples, color="C0", lw=1.4, label="samples/s")
    ax.axhline(median, color="C0", ls="--", lw=1, alpha=0.6, label=f"median {median:,.1f} samples/s")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("samples/s")
    ax.yaxis.set_major_formatter(figure.number_formatter())
    ratio = _constant_ratio(samples, tokens)
    if ratio:  # one curve, read on two scales
        secondary = ax.secondary_yaxis("right", functions=(_times(ratio), _times(1 / ratio)))
        secondary.set_ylabel(f"tokens/s ({ratio:,.0f} tokens per sample)")
        secondary.yaxis.set_major_formatter(figure.number_formatter())
        figure.legend(ax)
    elif tokens[0]:
        twin = ax.twinx()
        twin.plot(*tokens, color="C1", lw=1.2, label="tokens/s")
        twin.set_ylim(bottom=0)
        twin.set_ylabel("tokens/s")
        twin.yaxis.set_major_formatter(figure.number_formatter())
        figure.legend(ax, twin)
    else:
        figure.legend(ax)
    if mfu[0]:
        axes[1].plot(*mfu, color="C2", lw=1.4)
        axes[1].set_ylim(0, max(mfu[1]) * 1.2)
        axes[1].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        axes[1].set_ylabel("MFU (% of peak)")
    return figure.finish(fig, axes, path, "Throughput" + (" and MFU" if mfu[0] else ""), context)


def _plot_memory(metrics: Metrics, path: Path, context: str) -> Path:
    fig, axes = figure.new_figure()
    ax = axes[0]
    peak_steps, peak = metrics.series("mem_peak_bytes")
    reserved_steps, reserved = metrics.series("mem_reserved_bytes")
    ax.plot(peak_steps, [v / GIB for v in peak], color="C0", lw=1.5, label="peak allocated")
    ax.plot(reserved_steps, [v / GIB for v in reserved], color="C1", ls="--", lw=1.5, label="reserved")
    if peak_steps or reserved_steps:
        ax.set_ylim(0, max([*peak, *reserved]) / GIB * 1.15)
        ax.set_ylabel("GiB")
        figure.legend(ax)
    else:
        figure.note(ax, "no GPU memory recorded yet")
    return figure.finish(fig, axes, path, "GPU memory, rank 0", context)


# The x-ray heatmaps: (record field, title, colour map, value range); fp16 runs show the first two.
_FP16_MAPS = (
    (
        "underflow",
        "fp16 underflow: share of nonzero gradient elements below 2^-14 (1: all zero)",
        "Reds",
        (0.0, 1.0),
    ),
    ("headroom_log2", "overflow headroom: log2(65504 / largest scaled gradient)", "RdYlGn", (0.0, 16.0)),
)
_WARN_AT = {"underflow": UNDERFLOW_SHARE, "lost": LOST_SHARE}
_UPDATE_MAPS = (
    ("lost", "updates lost: fp32 master weight unchanged", "Reds", (0.0, 1.0)),
    ("stale", "updates below the compute dtype's resolution (kept by fp32 masters)", "Blues", (0.0, 1.0)),
)


def _plot_precision(metrics: Metrics, path: Path, context: str) -> Path:
    """The precision x-ray: a heatmap per measure, one row per layer and one column per x-ray, and in
    fp16 the loss-scale curve below; underflow and lost-update events as red dashed lines."""
    xrays = [r for r in metrics.precision if isinstance(r.get("layers"), dict) and r["layers"]]
    if not xrays:
        fig, axes = figure.new_figure()
        figure.note(
            axes[0], "no precision x-ray recorded (logging.precision_every is 0, or none was due yet)"
        )
        return figure.finish(fig, axes, path, "Precision x-ray", context)
    layers = list(dict.fromkeys(name for r in xrays for name in r["layers"]))
    fp16 = any(r.get("loss_scale") is not None for r in xrays)
    maps = _FP16_MAPS if fp16 else _UPDATE_MAPS
    map_in = max(1.6, 0.16 * len(layers) + 0.8)
    ratios = [map_in] * len(maps) + ([1.6] if fp16 else [])
    fig, axes = figure.new_figure(len(ratios), sum(ratios) + 1.0, ratios)
    from matplotlib import colormaps

    steps = [r["step"] for r in xrays]
    last = max(metrics.last_step, steps[-1])
    edges = cell_edges(steps, last)
    labels = short_names(layers)
    for ax, (field, title, cmap, (low, high)) in zip(axes, maps, strict=False):
        values = [[_cell(r["layers"].get(name), field) for r in xrays] for name in layers]
        # Grey where there is no value: no elements, no gradient, or a skipped step.
        colours = colormaps[cmap].with_extremes(bad="0.85")
        mesh = ax.pcolormesh(edges, range(len(layers) + 1), values, cmap=colours, vmin=low, vmax=high)
        ax.set_ylim(len(layers), 0)
        ax.set_yticks([i + 0.5 for i in range(len(layers))], labels, fontsize=6)
        ax.set_title(title, loc="left", fontsize=9)
        bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.01)
        if field in _WARN_AT:  # where launcher.analysis.health warns
            bar.ax.axhline(_WARN_AT[field], color="k", lw=1.5)
    if fp16:
        scale_steps, scales = metrics.series("loss_scale")
        axes[-1].step(scale_steps, scales, where="post", color="C0", lw=1.4, label="loss scale")
        axes[-1].set_yscale("log", base=2)
        axes[-1].set_ylabel("loss scale")
    for ax in axes:
        for e in (*metrics.named("underflow"), *metrics.named("lost_updates")):
            ax.axvline(e["step"], color="C3", ls="--", lw=1.2)
        ax.set_xlim(0, last)  # the run's steps, whichever the x-rays cover
    events = len(metrics.named("underflow")) + len(metrics.named("lost_updates"))
    title = "Precision x-ray" + (f" ({events} warning{'s' * (events != 1)}: red dashed)" if events else "")
    return figure.finish(fig, axes, path, title, context, above=True)


def cell_edges(steps: list[int], last: int) -> list[float]:
    """Cell edges around each x-ray step: half way to its neighbours, the outer cells as wide on
    their outer side, all within the run's steps (0 to `last`); a lone x-ray's cell is a 50th of that."""
    if len(steps) == 1:
        half = max(0.5, last / 100)
        return [max(0.0, steps[0] - half), min(float(last), steps[0] + half)]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    return [max(0.0, 2 * steps[0] - mids[0]), *mids, min(float(last), 2 * steps[-1] - mids[-1])]


def _cell(row: dict[str, Any] | None, field: str) -> float:
    value = None if row is None else row.get(field)
    if field == "underflow" and row is not None and row.get("zero") == 1 and row.get("elements"):
        value = 1.0  # every element zero: all flushed (as launcher.analysis.health judges it)
    return float(value) if value is not None and is_number(value) else float("nan")


def short_names(layers: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share."""
    parts = [name.split(".") for name in layers]
    common = 0
    while len(layers) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def left_out(metrics: Metrics, dtype: str | None, device: str | None) -> dict[str, str]:
    """The plots a run has nothing for and never will, and why: {file name: reason}.

    A run that could record a loss scale (fp16) or device memory (a GPU) and has not yet keeps its
    plot, with a note; bf16 and fp32 have no loss scale, and CPU runs record no device memory.
    """
    out = {}
    if dtype != "fp16" and not metrics.series("loss_scale")[0]:
        why = f"{dtype} needs none" if dtype in ("bf16", "fp32") else "none recorded"
        out["loss_scale.png"] = f"no loss scale: {why}"
    memory = metrics.series("mem_peak_bytes")[0] or metrics.series("mem_reserved_bytes")[0]
    if device != "cuda" and not memory:
        why = "CPU runs record no device memory" if device == "cpu" else "none recorded"
        out["memory.png"] = f"no memory curve: {why}"
    return out


def write_plots(
    metrics: Metrics,
    out_dir: Path,
    context: str = "",
    *,
    lr_of: Callable[[int], float] | None = None,
    leave_out: Collection[str] = (),
) -> list[Path]:
    """Write loss, lr, loss_scale, throughput, memory and precision PNGs into out_dir, less those
    named in `leave_out` (see `left_out`); return their paths.

    Args:
        lr_of: the run's schedule, the lr after n applied optimizer steps (see `lr_curve`).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write ({err.strerror})", hint="use --out DIR") from None
    plots: dict[str, Callable[[Path], Path]] = {
        "loss.png": lambda p: plot_loss({"": metrics}, p, context=context),
        "lr.png": lambda p: _plot_lr(metrics, p, context, lr_of),
        "loss_scale.png": lambda p: _plot_loss_scale(metrics, p, context),
        "throughput.png": lambda p: _plot_throughput(metrics, p, context),
        "memory.png": lambda p: _plot_memory(metrics, p, context),
        "precision.png": lambda p: _plot_precision(metrics, p, context),
    }
    return [draw(out_dir / name) for name, draw in plots.items() if name not in leave_out]
