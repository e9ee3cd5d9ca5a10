"""The recipe: its YAML loading, dotted overrides and validation, all problems at once.

The sections themselves (every field with its description) are launcher.recipe.sections;
this module re-exports them, so `from launcher.recipe.schema import Recipe` reads the
contract and its loader from one place. Unknown keys and wrong types are reported all
at once, each naming its dotted path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import UserError
from launcher.recipe.errors import RecipeProblems, attribute, describe_errors, leaf_keys, user_loc
from launcher.recipe.errors import dotted as dotted_key
from launcher.recipe.files import Loader, TooLarge, read_chain, yaml_reason
from launcher.recipe.rules import check_rules, skipped_rules
from launcher.recipe.sections import (
    Checkpoint,
    Data,
    Launch,
    Logging,
    Lora,
    LossScale,
    Model,
    Optimizer,
    Precision,
    Recipe,
    Scheduler,
    Slurm,
    Train,
    Zero,
)

__all__ = [
    "Checkpoint", "Data", "Launch", "Logging", "Lora", "LossScale", "Model", "Optimizer", "Precision",
    "Recipe", "Scheduler", "Slurm", "Train", "Zero", "all_keys", "explicitly_set", "load",
    "parse_override", "parse_value", "to_dict", "validate",
]  # fmt: skip


# --------------------------------------------------------------------------- loading


def load(path: str | Path, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply its `extends:` chain, the dotted overrides and the values, and validate.

    Args:
        path: the recipe file.
        overrides: `dotted.key=value` strings from the user; values are read as YAML scalars.
        values: dotted key -> value, set after the overrides exactly as they are, but taken as given
            (no YAML reading): what mplaunch itself sets, such as `logging.dir` for `--resume`.

    Returns:
        The validated recipe.

    Raises:
        UserError: with one line per problem, all problems at once.
    """
    path = Path(path)
    raw = read_chain(path, ())
    settings = [parse_override(item) for item in overrides]
    settings += list((values or {}).items())
    for dotted, value in settings:
        _set_dotted(raw, dotted, value)
    raw.setdefault("name", path.stem)
    raw.pop("extends", None)
    raw["source"] = str(path)
    return validate(raw, str(path), [dotted for dotted, _ in settings])


def validate(raw: dict[str, Any], label: str, override_paths: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a merged recipe dict, then its cross-field rules; raise every problem at once.

    When the schema fails, the rules still judge the recipe with defaults standing in for the keys
    that failed, except the groups of rules that read one of those keys (RecipeProblems.skipped).

    Args:
        raw: the merged recipe as read from YAML.
        label: where problems not set by an override come from (the recipe file).
        override_paths: dotted keys set on the command line, for attribution.

    Raises:
        RecipeProblems: one line per problem, with the stand-in recipe the plan's checks can still judge.
    """
    _drop_empty_sections(raw, Recipe)
    try:
        recipe, failed, lines = Recipe.model_validate(raw), set[str](), list[str]()
    except ValidationError as exc:
        lines = describe_errors(exc, Recipe)
        failed = {dotted_key(loc) for loc, kind in _failed(exc) if kind != "extra_forbidden"}
        stand_in = _stand_in(raw, exc)
        if stand_in is None:
            shown = [attribute(line, label, override_paths) for line in lines]
            raise RecipeProblems(shown, skipped=["the rules across keys"]) from None
        recipe = stand_in
    problems = check_rules(recipe, failed)
    if lines or problems:
        shown = [attribute(p, label, override_paths) for p in lines + problems]
        keys = {p.split(":", 1)[0] for p in lines + problems}
        raise RecipeProblems(shown, keys, recipe, failed, skipped_rules(failed))
    return recipe


def _failed(exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    """Each error's key as the user wrote it (up to its last name: a list item is its list) and its kind."""
    out = []
    for err in exc.errors():
        loc = user_loc(err["loc"], Recipe)
        while loc and (not isinstance(loc[-1], str) or loc[-1] == "[key]"):
            loc = loc[:-1]
        out.append((loc, str(err["type"])))
    return out


def _stand_in(raw: dict[str, Any], exc: ValidationError) -> Recipe | None:
    """The recipe with each key that failed the schema left out (its default stands in), or None when
    that does not validate either (a required key)."""
    kept = copy.deepcopy(raw)
    for loc, _ in _failed(exc):
        node: Any = kept
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc:
            node.pop(loc[-1], None)
    kept.setdefault("name", "recipe")  # a name that failed its pattern: the run directory's rule is skipped
    try:
        return Recipe.model_validate(kept)
    except ValidationError:
        return None


def _drop_empty_sections(raw: dict[str, Any], model: type[BaseModel]) -> None:
    # `slurm:` with every line below commented out reads as null; treat it as
    # an empty section (all defaults) rather than as a type error.
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in raw:
            if raw[name] is None:
                del raw[name]
            elif isinstance(raw[name], dict):
                _drop_empty_sections(raw[name], sub)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b.c=value` and read the value with YAML scalar semantics."""
    key, sep, text = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise UserError(f"override {item!r}: expected dotted.key=value", hint="e.g. train.max_steps=20")
    return key, parse_value(key, text)


def parse_value(key: str, text: str) -> Any:
    """A command-line value for `key`, read as a YAML scalar the way `key=value` reads it."""
    try:
        return yaml.load(text, Loader=Loader) if text else ""
    except TooLarge as exc:
        raise UserError(f"override {key}: value {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"override {key}: value {text!r} is not valid YAML ({yaml_reason(exc)})") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise UserError(f"override {dotted}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


def explicitly_set(recipe: Recipe) -> set[str]:
    """Dotted keys the user wrote (in a file or an override), as opposed to defaults."""
    out: set[str] = set()

    def walk(model: BaseModel, prefix: str) -> None:
        for name in model.model_fields_set:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                out.add(prefix + name)

    walk(recipe, "")
    return out


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (every default filled in)."""
    return recipe.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as plain data (to_dict, recipe.yaml) by dotted key: {"optimizer": {"lr": 1e-3}} ->
    {"optimizer.lr": 1e-3}; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def all_keys() -> list[str]:
    """Every valid dotted key of the recipe, for suggestions and the reference table."""
    return leaf_keys(Recipe)
