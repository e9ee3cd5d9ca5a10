"""A sweep's points from the command line: the grid of `key=v1,v2` arguments, a points file, the names.

Each argument `key=v1,v2` (values split on the commas outside brackets, braces and quotes; each read as
YAML like any override) is one axis of the grid, the cartesian product in argument order; `key=value`
with one value is a fixed override of every point. `--points FILE.yaml`, a list of mappings
{dotted.key: value} (`name:` names the point), is combined with the grid: every point of the file with
every grid point (the file alone when no key is swept).

Light side: no torch import.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from launcher.recipe import schema as recipe_mod
from launcher.recipe.files import Loader

UNSWEEPABLE = ("name", "logging.dir")  # they say where a point's run lives: the sweep decides that
MAX_NAME_CHARS = 100  # a recipe name may have 128; room for a hash suffix and a user's prefix


@dataclass(frozen=True)
class Draft:
    """A point before it has an index: its swept (key, value text) pairs and a name the user gave."""

    items: tuple[tuple[str, str], ...]
    given_name: str | None = None
    """A name from the points file: it stands for the items before `grid_from` (the file's own)."""
    grid_from: int = 0

    @property
    def overrides(self) -> tuple[str, ...]:
        return tuple(f"{key}={text}" for key, text in self.items)


# --------------------------------------------------------------------------- the arguments


def split_values(text: str) -> list[str]:
    """`1e-3,[a,b],'x,y'` -> ['1e-3', '[a,b]', "'x,y'"]: the commas outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and text[start:i].rstrip()[-1:] in ("", "[", "{", ",", ":"):
            quote = char  # a quote opens a YAML scalar only at its start (`don't` is plain text)
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_arguments(arguments: Sequence[str]) -> tuple[tuple[str, ...], list[tuple[str, list[str]]]]:
    """The command line's `key=value` arguments -> (fixed overrides, swept axes [(key, [value text])]).

    Raises:
        UserError: not `key=value`, a value that is not YAML, an empty value in a list, a key given twice,
            or `name` / `logging.dir` swept.
    """
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for argument in arguments:
        key, _ = recipe_mod.parse_override(argument)  # the key's form and the whole text as YAML
        if key in seen:
            raise UserError(f"sweep: {key} is given twice", hint="give every value in one key=v1,v2")
        seen.add(key)
        values = split_values(argument.partition("=")[2])
        if len(values) == 1:
            fixed.append(argument)
            continue
        if key in UNSWEEPABLE:
            raise UserError(f"sweep: {key} cannot be swept: the sweep names each point's run and its folder")
        if any(not v.strip() for v in values):
            raise UserError(f"sweep: {argument!r} has an empty value", hint="remove the stray comma")
        for value in values:
            recipe_mod.parse_value(key, value)
        axes.append((key, values))
    return tuple(fixed), axes


def read_points_file(path: Path) -> list[Draft]:
    """A YAML list of mappings {dotted.key: value}, each a point (`name:` names it).

    Raises:
        UserError: unreadable, not YAML, not a list of mappings, or a key that is no dotted key.
    """
    try:
        data = yaml.load(path.read_text(), Loader=Loader)
    except OSError as exc:
        raise UserError(f"--points {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--points {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    shape = "a YAML list of mappings, one per point, e.g. `- {optimizer.lr: 1e-3, train.seed: 1}`"
    if not isinstance(data, list) or not data or not all(isinstance(p, dict) for p in data):
        raise UserError(f"--points {path}: expected {shape}")
    return [_draft(path, i, entry) for i, entry in enumerate(data, 1)]


def _draft(path: Path, number: int, entry: dict[Any, Any]) -> Draft:
    where = f"--points {path}: point {number}"
    given = entry.get("name")
    if given is not None and not isinstance(given, str | int):
        raise UserError(f"{where}: name must be text, got {given!r}")
    items = []
    for key, value in entry.items():
        if key == "name":
            continue
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise UserError(f"{where}: {key!r} is not a dotted recipe key", hint="e.g. optimizer.lr")
        if key in UNSWEEPABLE:
            raise UserError(
                f"{where}: {key} cannot be set per point: the sweep names each run and its folder"
            )
        items.append((key, _as_text(key, value)))
    return Draft(tuple(items), None if given is None else str(given))


def _as_text(key: str, value: Any) -> str:
    """A YAML value as the `key=value` text that reads back as the same value."""
    if isinstance(value, str) and recipe_mod.parse_value(key, value) == value:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    text = text.removesuffix("...").strip()
    return text if recipe_mod.parse_value(key, text) == value else json.dumps(value)


def drafts(axes: list[tuple[str, list[str]]], from_file: list[Draft] | None) -> list[Draft]:
    """Every point: the grid's product in argument order, each combined with every point of the file.

    Raises:
        UserError: nothing to sweep, a key both in the file and on the command line, or two points
            that are the same run.
    """
    if not axes and not from_file:
        raise UserError(
            "sweep: nothing to sweep",
            hint="give a key several values (optimizer.lr=1e-4,3e-4) or --points FILE",
        )
    grid = [
        tuple(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*(v for _, v in axes))
    ]
    base = from_file or [Draft(())]
    swept = {k for k, _ in axes}
    out = []
    for first in base:
        both = sorted(swept & {k for k, _ in first.items})
        if both:
            raise UserError(f"sweep: {both[0]} is set by --points and swept on the command line; choose one")
        out += [Draft(first.items + cell, first.given_name, len(first.items)) for cell in grid]
    seen: dict[str, Draft] = {}
    for draft in out:
        other = seen.setdefault(canonical(draft.overrides), draft)
        if other is not draft:
            raise UserError(
                f"sweep: two points are the same run: {' '.join(draft.overrides) or '(no overrides)'}"
            )
    return out


def canonical(overrides: Sequence[str]) -> str:
    """Overrides as one comparable text: keys sorted, values as read (1e-3 and 0.001 are the same)."""
    return json.dumps(
        dict(sorted(recipe_mod.parse_override(o) for o in overrides)), sort_keys=True, default=str
    )


# --------------------------------------------------------------------------- names


def point_names(points: Sequence[Draft]) -> list[str]:
    """A readable, deterministic and unique run name for each point: `lr-1e-3_gbs-16` from the leaf key
    names and the values as typed; the full dotted key where two swept keys share a leaf; a short hash
    where the names collide or run long. A name from the points file comes first, then the grid's part."""
    keys = list(dict.fromkeys(k for p in points for k, _ in p.items))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    label = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves, strict=True)}
    names = []
    for point in points:
        items = point.items if point.given_name is None else point.items[point.grid_from :]
        parts = [f"{label[k]}-{_clean(t)}" for k, t in items]
        name = "_".join(([point.given_name] if point.given_name is not None else []) + parts) or "default"
        if len(name) > MAX_NAME_CHARS:
            name = f"{name[: MAX_NAME_CHARS - 9].rstrip('-_.')}-{_hash(point)}"
        names.append(name if name[0].isalnum() else f"p{name}")
    clashes = {n for n in names if names.count(n) > 1}
    names = [
        f"{n}-{_hash(p)}" if n in clashes and p.given_name is None else n
        for n, p in zip(names, points, strict=True)
    ]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(
            f"sweep: two points are named {twice[0]}", hint="give each point of --points its own name"
        )
    return names


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "empty"


def _hash(point: Draft) -> str:
    return hashlib.sha1(canonical(point.overrides).encode()).hexdigest()[:6]
