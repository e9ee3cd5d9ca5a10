"""`mplaunch sweep RECIPE key=v1,v2 ...`: one run per point of a grid (or of a YAML list of points).

A sweep lives in SWEEP_DIR (logging.dir/NAME, NAME from --name or "<recipe name>-sweep"); each point is an
ordinary run in SWEEP_DIR/<point name>, so every verb (report, export, --resume, compare) works on it.
SWEEP_DIR/sweep.json records the recipe, the fixed overrides and every point ever swept there, in a
stable order (a point's index is its place in that list, and a Slurm array element's index).

This module turns the command line into a Sweep (its points: launcher.run.sweep_points), checked (every
point's recipe loads) and merged with SWEEP_DIR/sweep.json; launcher.run.sweep_local runs it.
Light side: no torch import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.recipe import schema as recipe_mod
from launcher.recipe.rules import logging_dir
from launcher.run.sweep_points import Draft, canonical, drafts, parse_arguments, point_names, read_points_file
from launcher.rundir import checkpoint

SWEEP_FILE = "sweep.json"


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


# --------------------------------------------------------------------------- the sweep and its file


def sweep_dir(recipe: Path, fixed: Sequence[str], values: Mapping[str, Any], name: str | None) -> Path:
    """SWEEP_DIR: the recipe's logging.dir (with the fixed overrides) / (`name` or "<recipe name>-sweep").

    Raises:
        UserError: the recipe with the fixed overrides does not load, or `name` is no folder name.
    """
    base = recipe_mod.load(recipe, fixed, values)
    if name is not None and (not name or name in (".", "..") or "/" in name or not name.isprintable()):
        raise UserError(f"--name {name!r}: expected a folder name (no /)", hint="e.g. --name lr-sweep")
    return logging_dir(base)[0] / (name or f"{base.name}-sweep")


def read_record(directory: Path) -> dict[str, Any] | None:
    """SWEEP_DIR/sweep.json as written (None without one).

    Raises:
        UserError: the file is not a sweep record.
    """
    path = directory / SWEEP_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: not a sweep record ({exc})", hint="move it away or sweep with another --name"
        ) from None
    ok = isinstance(data, dict) and isinstance(data.get("points"), list)
    if not ok or not all(isinstance(p, dict) and {"name", "overrides"} <= p.keys() for p in data["points"]):
        raise UserError(f"{path}: not a sweep record", hint="move it away or sweep with another --name")
    record: dict[str, Any] = data
    return record


def merge(
    recipe: Path, fixed: tuple[str, ...], directory: Path, drafts_: Sequence[Draft]
) -> tuple[Sweep, list[Point]]:
    """The sweep with every point SWEEP_DIR/sweep.json records and the new ones appended, and this
    sweep's points (in the order given). A point recorded with the same overrides keeps its index and name.

    Raises:
        UserError: the directory holds a sweep of another recipe or other fixed overrides, or a
            recorded point of the same name has other overrides.
    """
    record = read_record(directory) or {"recipe": str(recipe), "fixed": list(fixed), "points": []}
    hint = f"sweep into another directory: --name {directory.name}-2"
    if record["recipe"] != str(recipe):
        raise UserError(f"{directory} holds a sweep of {record['recipe']}, not of {recipe}", hint=hint)
    if canonical(record["fixed"]) != canonical(fixed):
        was = " ".join(record["fixed"]) or "none"
        raise UserError(f"{directory} holds a sweep with other fixed overrides ({was})", hint=hint)
    every = [Point(i, p["name"], tuple(p["overrides"])) for i, p in enumerate(record["points"])]
    by_overrides = {canonical(p.overrides): p for p in every}
    by_name = {p.name: p for p in every}
    chosen = []
    for draft, name in zip(drafts_, point_names(drafts_), strict=True):
        point = by_overrides.get(canonical(draft.overrides))
        if point is None:
            if name in by_name:
                was = " ".join(by_name[name].overrides)
                raise UserError(
                    f"{directory}: its point {name} was run with {was}, not {' '.join(draft.overrides)}",
                    hint=hint,
                )
            point = Point(len(every), name, draft.overrides)
            every.append(point)
            by_name[name] = by_overrides[canonical(point.overrides)] = point
        chosen.append(point)
    return Sweep(recipe, fixed, directory, tuple(every)), chosen


def write_record(sweep: Sweep) -> None:
    """SWEEP_DIR/sweep.json, atomically (compare reads it to find and order the runs)."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": str(sweep.recipe),
        "fixed": list(sweep.fixed),
        "points": [{"name": p.name, "overrides": list(p.overrides)} for p in sweep.points],
    }
    checkpoint.write_atomic(sweep.dir / SWEEP_FILE, json.dumps(record, indent=1) + "\n")


def check_points(
    sweep: Sweep, points: Sequence[Point], values: Mapping[str, Any]
) -> dict[str, recipe_mod.Recipe]:
    """Each point's recipe, loaded as its run will load it; every point's problems at once.

    Raises:
        UserError: one line per problem, naming the points it is found in.
    """
    recipes, problems = {}, dict[str, list[str]]()
    for point in points:
        try:
            recipes[point.name] = recipe_mod.load(sweep.recipe, sweep.run_overrides(point), values)
        except UserError as err:
            for line in err.lines:
                problems.setdefault(line, []).append(point.name)
    if problems:
        raise UserError([f"sweep, {_which(names, len(points))}: {line}" for line, names in problems.items()])
    return recipes


def _which(names: list[str], total: int) -> str:
    if len(names) == total > 1:
        return "every point"
    return f"point{'s' if len(names) > 1 else ''} {', '.join(names)}"


def build(
    recipe: Path,
    arguments: Sequence[str],
    values: Mapping[str, Any],
    points_file: Path | None,
    name: str | None,
) -> tuple[Sweep, list[Point], dict[str, recipe_mod.Recipe]]:
    """The sweep the command line asks for: merged with its directory's record (not written), its
    points, and each point's recipe. Every refusal comes here, before anything runs.

    Raises:
        UserError: see parse_arguments, read_points_file, drafts, merge and check_points.
    """
    recipe = recipe.resolve()
    fixed, axes = parse_arguments(arguments)
    from_file = read_points_file(points_file) if points_file is not None else None
    all_drafts = drafts(axes, from_file)
    fixed_keys = {o.partition("=")[0] for o in fixed}
    for draft in all_drafts:
        clash = sorted(fixed_keys & {k for k, _ in draft.items})
        if clash:
            raise UserError(f"sweep: {clash[0]} is both fixed on the command line and swept; choose one")
    directory = sweep_dir(recipe, fixed, values, name)
    sweep, chosen = merge(recipe, fixed, directory, all_drafts)
    return sweep, chosen, check_points(sweep, chosen, values)
