"""The overlaid plots of `mplaunch compare`: one line per run, labelled by its differing recipe keys.

loss.png (train loss), eval_loss.png (when a run evaluated), lr.png and throughput.png (tokens/s),
each against the optimizer step. A run keeps its colour in every plot (its row's place), and the
legend sits below the axes so it never hides a curve. The canvas (matplotlib imported late, Agg, no
pyplot) is launcher.analysis.figure's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.analysis import figure
from launcher.analysis.compare_runs_rows import Row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

# Curves that span more than this factor (losses; the runs' peak learning rates) are drawn on a log
# axis, where the smaller ones stay readable.
LOG_SPAN = 8.0
_LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Overlay:
    """One figure: which series, from which records, under what names."""

    file: str
    title: str
    key: str
    kind: str  # "train" or "eval"
    ylabel: str


OVERLAYS = (
    Overlay("loss.png", "Train loss", "loss", "train", "train loss"),
    Overlay("eval_loss.png", "Eval loss", "eval_loss", "eval", "eval loss"),
    Overlay("lr.png", "Learning rate", "lr", "train", "learning rate"),
    Overlay("throughput.png", "Throughput", "tokens_per_s", "train", "tokens/s (step 1 left out)"),
)


def write_overlays(rows: Sequence[Row], out: Path, keys: Sequence[str], context: str) -> list[Path]:
    """Draw every overlay some run has data for into `out`; eval_loss.png only when a run evaluated.

    Args:
        keys: the differing recipe keys, named in each title.
        context: what is compared ("sweep lr-sweep, 4 runs"), after the title.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for overlay in OVERLAYS:
        if overlay.kind == "eval" and not any(_series(r, overlay)[0] for r in rows):
            continue
        written.append(_draw(overlay, rows, out / overlay.file, keys, context))
    return written


def _series(row: Row, overlay: Overlay) -> tuple[list[int], list[float]]:
    if row.metrics is None:
        return [], []
    series = row.metrics.series(overlay.key, overlay.kind)
    if overlay.key != "tokens_per_s":
        return series
    # Step 1 is logged alone and its time holds the one-time costs (as launcher.analysis.plots.steady):
    # it would squash the scale.
    pairs = [(s, v) for s, v in zip(*series, strict=True) if s != 1] or list(zip(*series, strict=True))
    return [s for s, _ in pairs], [v for _, v in pairs]


def _draw(overlay: Overlay, rows: Sequence[Row], path: Path, keys: Sequence[str], context: str) -> Path:
    labelled = [r.label for r in rows if r.metrics is not None]
    longest = max((len(x) for x in labelled), default=0)
    columns = min(3 if longest <= 30 else 2 if longest <= 60 else 1, max(1, len(labelled)))
    legend_rows = -(-len(labelled) // columns)
    fig, axes = figure.new_figure(1, figure.FIG_SIZE_IN[1] + 0.22 * legend_rows)
    ax = axes[0]
    handles: list[Line2D] = []
    drawn: list[list[float]] = []
    for i, row in enumerate(rows):
        steps, values = _series(row, overlay)
        if not steps:
            continue
        drawn.append(values)
        handles.append(_line(ax, i, len(rows), steps, values, row.label, overlay.kind == "eval"))
    ax.set_ylabel(overlay.ylabel)
    if not handles:
        figure.note(ax, f"no run recorded {overlay.ylabel}")
    else:
        _scale(ax, overlay, drawn)
        fig.legend(handles=handles, loc="outside lower center", ncols=columns, frameon=False, fontsize=9)
    title = overlay.title + (f" by {', '.join(keys)}" if keys else "")
    return figure.finish(fig, axes, path, title, context)


def _line(
    ax: Axes, index: int, count: int, steps: list[int], values: list[float], label: str, dots: bool
) -> Line2D:
    """Run `index` of `count`: tab10 colours up to 10 runs, tab20 up to 20, then dashes as well."""
    palette = "tab10" if count <= 10 else "tab20"
    size = 10 if count <= 10 else 20
    style = _LINE_STYLES[(index // size) % len(_LINE_STYLES)]
    from matplotlib import colormaps

    colour = colormaps[palette](index % size)
    marker = "o" if dots or len(steps) == 1 else None
    (line,) = ax.plot(steps, values, color=colour, ls=style, lw=1.5, marker=marker, ms=3.5, label=label)
    return line


def _scale(ax: Axes, overlay: Overlay, drawn: list[list[float]]) -> None:
    """A log axis where the runs lie orders of magnitude apart (loss: any values; lr: the runs' peaks)."""
    from matplotlib.ticker import ScalarFormatter

    spread = [max(v) for v in drawn if v] if overlay.key == "lr" else [v for run in drawn for v in run]
    positive = [v for v in spread if v > 0]
    if overlay.key != "tokens_per_s" and positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_yscale("log")
        ax.set_ylabel(f"{overlay.ylabel} (log axis)")
        return
    if overlay.key == "lr":
        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-2, 3))
        ax.yaxis.set_major_formatter(formatter)
        ax.set_ylim(bottom=0)
    elif overlay.key == "tokens_per_s":
        ax.yaxis.set_major_formatter(figure.number_formatter())
        ax.set_ylim(bottom=0)
