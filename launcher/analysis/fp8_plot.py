"""`mplaunch report`'s fp8 heatmap (fp8.png): how the fp8 casts of each converted layer fit.

One heatmap per cast (the input, the weight, the output gradient): a row per layer computing in
fp8, a column per precision x-ray, the colour the share of nonzero elements the cast rounds to zero
(log scale, from 1e-6, where healthy layers sit, to 1; the colour bar's black line is the
fp8_range event's threshold, launcher.analysis.fp8_range). A cell whose cast saturated carries a
black cross; fp8_range events are red dashed lines. Grey: not measured (the cast is not fp8, or
FSDP2's fp8 all-gather cast the weight before the layer saw it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from launcher.analysis import figure
from launcher.analysis.fp8_range import EVENT, ROLES, UNDERFLOW_SHARE
from launcher.analysis.plots import cell_edges, short_names
from launcher.rundir.metrics_log import Metrics, is_number

FILE = "fp8.png"
FLOOR_LOG10 = -6.0  # shares below 1e-6 (zero included) take the lowest colour


def fp8_xrays(metrics: Metrics) -> list[dict[str, Any]]:
    """The precision records that hold fp8 columns (fp8 runs' x-rays)."""
    return [r for r in metrics.precision if isinstance(r.get("layers"), dict) and _fp8_layers([r])]


def _fp8_layers(xrays: list[dict[str, Any]]) -> list[str]:
    return list(
        dict.fromkeys(
            name
            for r in xrays
            for name, row in r["layers"].items()
            if isinstance(row, dict) and any(k.startswith("fp8_") for k in row)
        )
    )


def _log_share(row: dict[str, Any] | None, role: str) -> float:
    value = None if row is None else row.get(f"fp8_{role}_underflow")
    if value is None or not is_number(value):
        return float("nan")
    return max(FLOOR_LOG10, math.log10(value)) if value > 0 else FLOOR_LOG10


def plot_fp8(metrics: Metrics, path: Path, context: str) -> Path:
    """Draw fp8.png (see the module docstring)."""
    xrays = fp8_xrays(metrics)
    if not xrays:
        fig, axes = figure.new_figure()
        figure.note(axes[0], "no fp8 x-ray recorded (logging.precision_every is 0, or none was due yet)")
        return figure.finish(fig, axes, path, "fp8 x-ray", context)
    layers = _fp8_layers(xrays)
    formats = {**{"input": "e4m3", "weight": "e4m3", "grad": "e5m2"}, **(xrays[-1].get("fp8_formats") or {})}
    map_in = max(1.4, 0.16 * len(layers) + 0.8)
    fig, axes = figure.new_figure(len(ROLES), map_in * len(ROLES) + 1.0, [map_in] * len(ROLES))
    from matplotlib import colormaps

    steps = [r["step"] for r in xrays]
    last = max(metrics.last_step, steps[-1])
    edges = cell_edges(steps, last)
    colours = colormaps["magma_r"].with_extremes(bad="0.85")
    for ax, (role, what) in zip(axes, ROLES.items(), strict=True):
        values = [[_log_share(r["layers"].get(name), role) for r in xrays] for name in layers]
        mesh = ax.pcolormesh(edges, range(len(layers) + 1), values, cmap=colours, vmin=FLOOR_LOG10, vmax=0.0)
        ax.set_ylim(len(layers), 0)
        ax.set_yticks([i + 0.5 for i in range(len(layers))], short_names(layers), fontsize=6)
        ax.set_title(
            f"{what} ({formats[role]}): share of nonzero elements rounded to zero", loc="left", fontsize=9
        )
        bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.01)
        bar.set_ticks([FLOOR_LOG10, -4, -2, 0], labels=["≤1e-6", "1e-4", "1e-2", "1"])
        bar.ax.axhline(math.log10(UNDERFLOW_SHARE), color="k", lw=1.5)
        crosses = [
            ((a + b) / 2, i + 0.5)
            for j, (a, b) in enumerate(zip(edges, edges[1:], strict=False))
            for i, name in enumerate(layers)
            if ((xrays[j]["layers"].get(name) or {}).get(f"fp8_{role}_saturated") or 0) > 0
        ]
        if crosses:
            xs, ys = [c[0] for c in crosses], [c[1] for c in crosses]
            ax.scatter(xs, ys, marker="x", color="k", s=30, label="saturated")
            figure.legend(ax)
        for e in metrics.named(EVENT):
            ax.axvline(e["step"], color="C3", ls="--", lw=1.2)
        ax.set_xlim(0, last)
    events = len(metrics.named(EVENT))
    title = "fp8 x-ray" + (
        f" ({events} fp8_range warning{'s' * (events != 1)}: red dashed)" if events else ""
    )
    return figure.finish(fig, axes, path, title, context, above=True)
