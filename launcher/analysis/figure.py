"""The canvas the plots are drawn on: matplotlib imported late, a bare Figure, titles, legends, saving.

matplotlib (the `report` extra) is imported only when a figure is made, with a bare Figure on the
Agg canvas so pyplot's global state is never touched. launcher.analysis.plots decides what each
figure shows; this module decides how every figure looks (size, step axis, number format).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UserError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

FIG_SIZE_IN = (8.0, 4.5)
DPI = 110
INSTALL_HINT = "pip install -e '.[report]'"


def require_matplotlib(verb: str) -> None:
    """Refuse `verb` up front, before anything runs, when the plots it draws cannot be drawn.

    Raises:
        UserError: matplotlib (the `report` extra) is not installed.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"mplaunch {verb} needs matplotlib (not installed)", hint=INSTALL_HINT)


def new_figure(
    nrows: int = 1, height_in: float = FIG_SIZE_IN[1], ratios: Sequence[float] = (3, 2)
) -> tuple[Figure, list[Axes]]:
    """A figure of `nrows` axes sharing the step axis, `ratios` their heights (matplotlib imported here)."""
    require_matplotlib("report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no figure registry.
    fig = Figure(figsize=(FIG_SIZE_IN[0], height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        nrows, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": list(ratios)[:nrows]}
    )
    return fig, list(axes[:, 0])


def number_formatter() -> Formatter:
    """Tick labels as 1,234,567, with the decimals the spacing needs."""
    from matplotlib.ticker import Formatter

    class Thousands(Formatter):
        """1,234,567 style, with as many decimals as the tick spacing needs (0.5, 0.25...)."""

        decimals = 0

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            spacing = min((b - a for a, b in zip(values, values[1:], strict=False) if b > a), default=1.0)
            self.decimals = next(
                d for d in range(7) if d == 6 or abs(spacing * 10**d - round(spacing * 10**d)) < 1e-6
            )
            return [self(x) for x in values]

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:,.{self.decimals}f}"

    return Thousands()


def finish(fig: Figure, axes: list[Axes], path: Path, title: str, context: str, above: bool = False) -> Path:
    """Title (above all axes when `above`, else on the first), step axis, and save."""
    from matplotlib.ticker import MaxNLocator

    text = f"{title} — {context}" if context else title
    if above:
        fig.suptitle(text, x=0.01, ha="left")
    else:
        axes[0].set_title(text, loc="left")
    for ax in axes:
        drawn = any(len(list(line.get_xdata())) for line in ax.lines) or ax.collections  # type: ignore[arg-type]
        if not drawn:  # a note only: no scale to show
            ax.set_xticks([])
            continue
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(number_formatter())
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(path)
    return path


def note(ax: Axes, text: str) -> None:
    """A grey note in place of a curve (nothing recorded yet)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35")
    ax.set_yticks([])


def legend(*axes: Axes) -> None:
    """One legend for the curves of all axes; below the plot when twin axes could hide it."""
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if len(axes) > 1:
        axes[0].figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    elif handles:
        axes[0].legend(handles=handles, loc="best", framealpha=0.9)
