"""Recipe files: shipped recipes found by name, YAML read the way recipes are, `extends:` chains.

Recipe YAML refuses duplicate keys, reads numbers as YAML 1.2 does, and refuses a document
whose aliases would expand it past a bound (MAX_VALUES, MAX_TEXT_CHARS).

The result is a plain merged mapping; launcher.recipe.schema applies the overrides and validates it.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def locate(name: str, verbs: list[str] | tuple[str, ...] = ()) -> Path:
    """A recipe path as given, or a shipped recipe by name (`bert`, `bert.yaml`, `recipes/bert.yaml`).

    Args:
        name: what the user typed.
        verbs: command names; a name close to one of them gets a "did you mean" hint.

    Raises:
        UserError: no such file and no such shipped recipe.
    """
    path = Path(name)
    if path.exists():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = RECIPES_DIR / f"{stem}.yaml"
    if path.parent not in (Path(), Path("recipes")):
        # A path into another folder names that file: training a shipped recipe of the same
        # name instead would run the wrong recipe without a word.
        hint = f"the shipped recipe of that name is `{stem}`" if shipped.is_file() else "check the path"
        raise UserError(f"{name}: recipe file not found", hint=hint)
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    verb = difflib.get_close_matches(name, list(verbs), n=1, cutoff=0.75)
    hint = f"did you mean `mplaunch {verb[0]}`?" if verb else f"shipped recipes: {names}"
    raise UserError(f"{name}: recipe file not found", hint=hint)


# What one YAML document may expand to, aliases counted at every use. The biggest shipped
# recipe (bert.yaml) is 62 values and 325 characters of scalars; these bounds leave room for
# big lists in a recipe's model.kwargs while refusing a "billion laughs" of nested aliases
# before anything (a merge, validation, the dry run's printout) expands it.
MAX_VALUES = 100_000
MAX_TEXT_CHARS = 10_000_000


class TooLarge(yaml.YAMLError):
    """A YAML document expands past MAX_VALUES values or MAX_TEXT_CHARS characters of scalars."""


class Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (PyYAML silently keeps the last) and documents
    whose aliases would expand them past MAX_VALUES values or MAX_TEXT_CHARS characters."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        values, chars = expanded_size(node, {}, set()) if node is not None else (0, 0)
        if values > MAX_VALUES or chars > MAX_TEXT_CHARS:
            raise TooLarge(
                f"expands to more than {MAX_VALUES:,} values or {MAX_TEXT_CHARS:,} characters once its "
                "aliases (*name) are counted at every use; a recipe is far smaller, so check its anchors "
                "(&name) and aliases"
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 reads them. YAML 1.1 needs a dot in a float, so PyYAML
# reads lr: 1e-4 as a string; and it reads base-60 numbers, so slurm's
# time: 1:00:00 would arrive as the integer 3600.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"  # a dot, maybe an exponent
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # an exponent without a dot: 1e-4
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def expanded_size(node: yaml.Node, memo: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """(values, scalar characters) of `node` with every alias expanded; linear in the nodes,
    since an aliased node is one object whose size is computed once."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:  # an alias inside its own anchor: it expands without end
        return MAX_VALUES + 1, 0
    if isinstance(node, yaml.ScalarNode):
        return 1, len(node.value)
    open_.add(key)
    children: list[yaml.Node] = (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
    )
    values, chars = 1, 0
    for child in children:
        v, c = expanded_size(child, memo, open_)
        values, chars = values + v, chars + c
        if values > MAX_VALUES or chars > MAX_TEXT_CHARS:
            break  # enough to refuse it; the counts stay small
    open_.discard(key)
    memo[key] = (values, chars)
    return values, chars


def read_yaml(text: str) -> Any:
    """Parse YAML the way recipes are read (duplicate keys refused, 1e-4 is a number, size bounded).

    Raises:
        TooLarge: the document's aliases expand it past MAX_VALUES or MAX_TEXT_CHARS.
        yaml.YAMLError: it is not valid YAML.
    """
    return yaml.load(text, Loader=Loader)


def read_chain(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"{path}: extends cycle: {cycle}")
    raw = read_file(path)
    parent = raw.get("extends")
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: extends: expected the path of a base recipe, got {parent!r}")
    base_file = path.parent / parent
    if not base_file.is_file():
        raise UserError(f"{path}: extends: base recipe not found: {base_file}")
    base = read_chain(base_file, (*chain, resolved))
    _rebase_paths(base, base_file, path)
    return deep_merge(base, {k: v for k, v in raw.items() if k != "extends"})


def read_file(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping, without its extends chain; UserError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{path}: recipe file not found", hint="`mplaunch recipes` lists the shipped ones"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = read_yaml(text)
    except TooLarge as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_reason(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _rebase_paths(base: dict[str, Any], base_file: Path, child_file: Path) -> None:
    # Data paths are relative to the file that names them; after merging they
    # are read relative to the child, so rewrite the base's to stay correct.
    data = base.get("data")
    if not isinstance(data, dict):
        return
    rel = Path(_relpath(base_file.parent, child_file.parent))
    if isinstance(data.get("paths"), list):
        data["paths"] = [
            p if not isinstance(p, str) or Path(p).is_absolute() else str(rel / p) for p in data["paths"]
        ]
    if isinstance(data.get("tokenizer"), str) and not Path(data["tokenizer"]).is_absolute():
        data["tokenizer"] = str(rel / data["tokenizer"])


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in `top` replaces what `base` had."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
