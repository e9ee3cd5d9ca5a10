"""`mplaunch sweep RECIPE key=v1,v2 ...`: one run per point of a grid (or of a YAML list of points).

A sweep lives in SWEEP_DIR (logging.dir/NAME, NAME from --name or "<recipe name>-sweep"); each point is an
ordinary run in SWEEP_DIR/<point name>, so every verb (report, export, --resume, compare) works on it.
SWEEP_DIR/sweep.json records the recipe, the fixed overrides and every point ever swept there, in a
stable order (a point's index is its place in that list, and a Slurm array element's index).

Light side: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One point of a sweep: one run."""

    index: int
    """Its place in SWEEP_DIR/sweep.json's points, stable across reruns (the Slurm array index)."""
    name: str
    """The run's name (a valid recipe `name`), derived from the swept values, e.g. "lr-1e-3"."""
    overrides: tuple[str, ...]
    """The point's own `key=value` overrides (the swept keys only)."""


@dataclass(frozen=True)
class Sweep:
    """A sweep's recipe, the overrides every point shares, its directory and its points."""

    recipe: Path
    """The recipe file, resolved (a shipped recipe's name becomes its path)."""
    fixed: tuple[str, ...]
    """`key=value` overrides applied to every point (arguments with one value)."""
    dir: Path
    """SWEEP_DIR (absolute): a point's run directory is dir / point.name."""
    points: tuple[Point, ...]

    def run_dir(self, point: Point) -> Path:
        return self.dir / point.name

    def run_overrides(self, point: Point) -> list[str]:
        """The overrides that make `point`'s run: the fixed ones, the point's, then where it lives."""
        return [*self.fixed, *point.overrides, f"logging.dir={self.dir}", f"name={point.name}"]
