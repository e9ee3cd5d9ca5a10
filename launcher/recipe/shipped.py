"""`mplaunch recipes`: list, print or copy the shipped recipes.

Recipe-file work that sits on the launcher side beside the other verbs' work; it reads
recipes only through launcher.recipe.files.

Light side: the standard library and PyYAML.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from launcher.errors import UserError
from launcher.recipe import files as recipe_files
from launcher.recipe.files import RECIPES_DIR


def list_all() -> int:
    """Each shipped recipe's name and first line (its comment)."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        print(f"{path.stem:<16} {first.lstrip('# ')}")
    return 0


def show(path: Path) -> int:
    """Print the recipe file as it is."""
    print(path.read_text(), end="")
    return 0


def copy(path: Path, where: str) -> int:
    """Copy a recipe with the files it extends and the data it names, so the copy loads on its own.

    `where` is a file name, or a folder (one that exists, or any path ending in a slash,
    created as needed) that receives the recipe under its own name.

    Raises:
        UserError: a file of the copy is already there with other bytes; nothing was copied.
    """
    dest = Path(where)
    if dest.is_dir() or where.endswith(("/", os.sep)):
        dest = dest / path.name
    pairs = _copy_pairs(path, dest)
    # A base or data file already there with the same bytes (an earlier copy of
    # a sibling recipe) is shared; anything else, and the recipe itself, is refused.
    clashes = [
        str(t)
        for s, t in pairs
        if t.exists() and (t == dest or t.is_dir() or t.read_bytes() != s.read_bytes())
    ]
    if clashes:
        raise UserError([f"{t}: already exists; nothing was copied" for t in clashes])
    for src, target in pairs:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            print(f"copied {src} -> {target}")
    return 0


def _copy_pairs(path: Path, dest: Path) -> list[tuple[Path, Path]]:
    # Each file keeps its position relative to the file that names it, so
    # `extends:` and `data.paths` in the copies stay correct unedited.
    pairs: list[tuple[Path, Path]] = []
    src: Path | None = path
    while src is not None and src.resolve() not in {s.resolve() for s, _ in pairs}:
        pairs.append((src, dest))
        raw = recipe_files.read_file(src)
        data = raw.get("data")
        names = data.get("paths", []) if isinstance(data, dict) else []
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and not Path(name).is_absolute() and (src.parent / name).is_file():
                pairs.append((src.parent / name, dest.parent / name))
        parent = raw.get("extends")
        src, dest = (src.parent / parent, dest.parent / parent) if isinstance(parent, str) else (None, dest)
    return pairs
