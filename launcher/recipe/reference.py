"""The recipe reference: every key with its type, default and description, from the schema's docstrings.

`mplaunch check --explain` prints it; the README's table is `reference_markdown()` (a test keeps them in sync).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from launcher.recipe.sections import Recipe


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every recipe key: `check --explain` and the README."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = field.annotation
            if field.exclude:
                continue
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")
                continue
            default = "file name" if field.is_required() else _default_text(field.default)
            rows.append(
                (prefix + name, _type_name(sub, tuple(field.metadata)), default, field.description or "")
            )

    walk(Recipe, "")
    return rows


def reference_markdown() -> str:
    """The README's recipe reference: one table row per key, from the field docstrings."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, type_, default, doc in reference_rows():
        cells = (f"`{key}`", type_, f"`{default}`", doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _type_name(annotation: Any, metadata: tuple[Any, ...] = ()) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], (*metadata, *args[1:]))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple and len(set(args)) == 1:
        return f"list of {len(args)} ({_type_name(args[0])})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    name = {"Any": "any"}.get(
        getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation))
    )
    # Every integer is below 2**63 (torch's int64); the reference says so once, not on every row.
    bounds = [
        f"{op} {getattr(m, attr)}"
        for m in _flat(metadata)
        for attr, op in _OPS
        if hasattr(m, attr) and getattr(m, attr) != 2**63
    ]
    return " ".join([name, ", ".join(bounds)]) if bounds else name


_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _flat(metadata: tuple[Any, ...]) -> list[Any]:
    # A FieldInfo inside Annotated keeps its constraints in its own metadata.
    return [m for item in metadata for m in (getattr(item, "metadata", None) or [item])]


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value >= 1024:
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)
