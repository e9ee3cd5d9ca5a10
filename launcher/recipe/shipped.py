"""The shipped recipes: which file a recipe name on the command line means (`locate`), and
`mplaunch recipes`: list, print or copy them.

Recipe-file work that sits on the launcher side beside the other verbs' work; it reads
recipes only through launcher.recipe.files.

Light side: the standard library and PyYAML.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path

from launcher.errors import UserError
from launcher.recipe import files as recipe_files
from launcher.recipe.files import RECIPES_DIR

SUFFIXES = (".yaml", ".yml")


def locate(name: str, verbs: Sequence[str] = ()) -> tuple[Path, str | None]:
    """The recipe file a command line names, and a note to print when the name was ambiguous.

    A file wins over a shipped recipe: the path as given, else the name with `.yaml` or `.yml`
    (`gpt2_tiny` and `gpt2_tiny.yml` both find an edited `./gpt2_tiny.yaml`), else the shipped
    recipe of that name (launcher.recipe.files.locate). The note says which file a looked-up name
    took when a shipped recipe has the same name, or when the suffix typed was not the file's.

    Raises:
        UserError: both NAME.yaml and NAME.yml exist for a name without a suffix; or no file
            and no shipped recipe has the name.
    """
    path = Path(name)
    if path.exists():
        return path, None
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    found = [f for f in (path.with_name(stem + s) for s in SUFFIXES) if f.is_file()]
    if len(found) > 1:
        raise UserError(
            f"{name}: both {_shown(found[0])} and {_shown(found[1])} exist", hint="name the file to use"
        )
    if not found:
        return recipe_files.locate(name, verbs=list(verbs)), None
    shipped = RECIPES_DIR / f"{stem}.yaml"
    same_name = shipped.is_file() and not shipped.samefile(found[0])
    if not same_name and path.name == stem:
        return found[0], None
    also = f" (a shipped recipe has the same name: mplaunch recipes {stem})" if same_name else ""
    return found[0], f"{name}: using {_shown(found[0])}{also}"


def named(name: str) -> Path | None:
    """The shipped recipe a bare name (no folder) means, for `mplaunch recipes NAME`."""
    if os.sep in name or "/" in name:
        return None
    shipped = RECIPES_DIR / f"{name.removesuffix('.yaml').removesuffix('.yml')}.yaml"
    return shipped if shipped.is_file() else None


def _shown(path: Path) -> str:
    # `./gpt2_tiny.yaml`, so the line reads as a file beside the user, not a recipe's name.
    return str(path) if path.is_absolute() or path.parent != Path() else f".{os.sep}{path}"


def list_all() -> int:
    """Each shipped recipe's name and the first sentence of its leading comment, the sentences in
    one column wrapped to the terminal's width (below the names on a terminal too narrow for both)."""
    rows = [(path.stem, _first_sentence(path.read_text())) for path in sorted(RECIPES_DIR.glob("*.yaml"))]
    columns = shutil.get_terminal_size().columns - 1  # a full last column wraps on some terminals
    indent = max((len(name) for name, _ in rows), default=0) + 2
    below = columns - indent < 30  # too narrow for both side by side
    if below:
        indent = 4
    for name, text in rows:
        if below or not text:
            print(name)
        if text:
            first = " " * indent if below else f"{name:<{indent}}"
            wrapper = textwrap.TextWrapper(
                max(columns, indent + 20),
                initial_indent=first,
                subsequent_indent=" " * indent,
                break_long_words=False,  # paths and file names stay whole
                break_on_hyphens=False,
            )
            print(wrapper.fill(text))
    return 0


def _first_sentence(text: str) -> str:
    """The recipe's leading comment lines joined, up to the first '.', '!' or '?' before a space."""
    lines = itertools.takewhile(lambda line: line.startswith("#"), text.splitlines())
    joined = " ".join(line.lstrip("#").strip() for line in lines)
    return re.split(r"(?<=[.!?])\s+", joined.strip(), maxsplit=1)[0]


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
