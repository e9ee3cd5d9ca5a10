"""Pydantic's validation errors as one line per problem, each naming the dotted key path the user wrote;
and `RecipeProblems`, a recipe's problems with what the checks after them can still judge.

Kept apart from the schema so that `recipe.py` reads as the reference manual.
Every function takes the root model as an argument, so this module imports
nothing from `recipe` (but the Recipe type, for type checking).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from launcher.errors import UserError

if TYPE_CHECKING:
    from launcher.recipe.sections import Recipe


class RecipeProblems(UserError):
    """A recipe's problems (schema and rules), one line each, and what the plan can still check.

    Args:
        problems: the lines of the problems, each naming where it was set (attribute).
        keys: the dotted key each problem is about (a later check's line about one of them is left out).
        stand_in: the recipe with defaults standing in for the keys that failed the schema (unknown
            keys left out): the plan's parts that read none of `failed` judge it; None when there is none.
        failed: dotted keys whose values failed the schema (unknown keys are not among them: leaving
            one out changes nothing else).
        skipped: what was not checked because it reads a failed key (launcher.plan.resolve.plan_file,
            which checks the plan too, names them on a last line).
    """

    def __init__(
        self,
        problems: list[str],
        keys: Collection[str] = (),
        stand_in: Recipe | None = None,
        failed: Collection[str] = (),
        skipped: Sequence[str] = (),
    ) -> None:
        super().__init__(problems)
        self.problems = self.lines
        self.keys, self.failed, self.skipped = set(keys), set(failed), list(skipped)
        self.stand_in = stand_in

    def reads_failed(self, keys: Collection[str]) -> bool:
        """Whether a check that reads `keys` (dotted keys or sections) reads a key that failed."""
        return any(reads(keys, key) for key in self.failed)


def reads(keys: Collection[str], key: str) -> bool:
    """Whether `key` is one of `keys`, inside one of them (a section), or holds one of them."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)


def not_checked(what: Sequence[str]) -> list[str]:
    """The last line when checks were skipped because they read keys that failed: say which."""
    if not what:
        return []
    return [f"not checked until the problems above are fixed: {', '.join(dict.fromkeys(what))}"]


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per problem; the errors pydantic reports for each branch of a union become one line."""
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        grouped.setdefault(user_loc(err["loc"], root), []).append(dict(err))
    return [_describe(loc, errs, root) for loc, errs in grouped.items()]


def attribute(line: str, label: str, override_paths: list[str] | tuple[str, ...]) -> str:
    """Prefix a problem with where it came from: the file `label`, or the override that set the key."""
    key = line.split(": ", 1)[0]
    for dotted in reversed(override_paths):  # the last override of a key is the one that counts
        if key == dotted:
            return f"override {line}"
        if key.startswith((dotted + ".", dotted + "[")) or dotted.startswith(key + "."):
            return f"override {dotted}: {line}"
    return f"{label}: {line}"


def dotted(loc: tuple[Any, ...]) -> str:
    """('train', 'micro_batch_size') -> 'train.micro_batch_size'; list indices as [i]."""
    out = ""
    for part in loc:
        text = str(part) if str(part).isprintable() else repr(part)  # a key may hold a newline
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + text
    return out


def user_loc(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[Any, ...]:
    # Pydantic adds the name of the union branch it tried ("literal['auto']",
    # "constrained-int") after a union-typed field; the user never wrote it.
    # Walk the schema so a user's own key that happens to be called "int" stays.
    out: list[Any] = []
    annotation: Any = root
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            continue
        out.append(part)
        annotation = _child(annotation, part)
        skip_tag = _is_union(annotation)
    return tuple(out)


def _strip(annotation: Any) -> Any:
    """Drop Annotated[...] and a `| None`, which pydantic does not report as a union branch."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif _union_args(annotation) is not None and type(None) in typing.get_args(annotation):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    return typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else None


def _is_union(annotation: Any) -> bool:
    return _union_args(_strip(annotation)) is not None


def _child(annotation: Any, part: Any) -> Any:
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple) and isinstance(part, int) and args:
        return args[min(part, len(args) - 1)] if origin is tuple else args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _describe(loc: tuple[Any, ...], errs: list[dict[str, Any]], root: type[BaseModel]) -> str:
    err = errs[0]
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        return f"{dotted(loc)}: unknown key{did_you_mean([str(p) for p in loc], root)}"
    if loc and loc[-1] == "[key]":
        return f"{dotted(loc[:-2])}: key {_show(given)} is not a string"
    if kind == "invalid_key":
        return f"{dotted((*loc[:-1], _show(given)))}: unknown key (keys are names, not numbers or null)"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        return f"{dotted(loc[:-1])}: too few items (item {loc[-1]} is missing)"
    if kind == "missing":
        return f"{dotted(loc)}: required key is missing"
    if kind in ("model_type", "model_attributes_type"):
        return f"{dotted(loc)}: expected a section (mapping of keys), got {_show(given)}"
    if kind == "value_error":
        return f"{dotted(loc)}: {err['msg'].removeprefix('Value error, ')}"
    wanted = [_expected(e) for e in errs]
    alternatives = wanted[0] + "".join(f", or {w.removeprefix('expected ')}" for w in wanted[1:])
    return f"{dotted(loc)}: {alternatives}, got {_show(given)}"


_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _expected(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '').replace(' or ', ', ')}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "")
        if bound == 2**63:
            return "expected a value < 2**63 (torch's 64-bit integers hold no more)"
        return f"expected a value {_BOUNDS[kind]} {bound}"
    if kind == "string_pattern_mismatch":
        return f"expected text matching {ctx.get('pattern')}"
    if kind in ("too_short", "too_long"):
        return f"expected {ctx.get('min_length', ctx.get('max_length'))} items"
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads yes/no/on/off as true/false)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    return repr(value)


def leaf_keys(root: type[BaseModel]) -> list[str]:
    """Every valid dotted key below `root`."""
    keys: list[str] = []
    for name, field in root.model_fields.items():
        if field.exclude:
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += [f"{name}.{k}" for k in leaf_keys(sub)]
        else:
            keys.append(name)
    return keys


def _section_at(loc: list[str], root: type[BaseModel]) -> type[BaseModel] | None:
    """The section model that holds the key at `loc`, or None when the parent is not a section."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


def did_you_mean(loc: list[str], root: type[BaseModel]) -> str:
    """A '; did you mean X?' suffix for an unknown key at `loc` (a list of names), or ''."""
    model = _section_at(loc, root)
    key = loc[-1]
    prefix = "".join(f"{p}." for p in loc[:-1])
    here = [n for n, f in model.model_fields.items() if not f.exclude] if model is not None else []
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    # The key may belong to another section: train.lr -> optimizer.lr.
    everywhere = leaf_keys(root)
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
    if not elsewhere:
        leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        elsewhere = [leaves[c] for c in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.8)]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return f"; valid keys here: {', '.join(here)}" if here else ""
