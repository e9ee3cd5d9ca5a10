"""The recipe's one door for code: model.target / data.target, "package.module:factory".

Light side (`check`, the dry run): `find` looks for the module's file the way the workers will
import it, without importing it (that may import torch). Worker side: `load` imports the module,
with the recipe's folder (`Plan.import_dir`) first on the search path, then the working
directory, PYTHONPATH and installed packages, and returns the factory; `takes` says whether the
factory accepts a keyword the launcher can give (vocab_size, seq_len, seed).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec, PathFinder
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from launcher.recipe.rules import BUILT_IN_MODEL_KEYS, DATASET_KEYS
from launcher.recipe.sections import Recipe
from launcher.rundir.layout import PLAN_FILE, RECIPE_FILE


def load(target: str, import_dir: str | None, key: str) -> Callable[..., Any]:
    """The factory `target` names, imported as `find` looked for it.

    Raises:
        ValueError: one line naming `key`: the module cannot be imported, or has no such function.
    """
    module_name, _, attr = target.partition(":")
    if import_dir is not None and sys.path[:1] != [import_dir]:
        sys.path.insert(0, import_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{key}: cannot import {module_name!r} ({exc})") from None
    factory: Callable[..., Any] | None = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{key}: {module_name!r} has no function {attr!r}")
    return factory


def takes(factory: Callable[..., Any], name: str) -> bool:
    """The factory's signature has a keyword `name`, or **kwargs."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass only what the user wrote
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        p.kind == inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind in keyword) for p in params
    )


def import_dir(source: str) -> str | None:
    """The recipe's folder, where model.target is imported from first.

    For RUN_DIR/recipe.yaml (`--resume RUN_DIR`) that is the first launch's: its plan.json says.
    """
    if not source:
        return None
    path = Path(source).resolve()
    saved = path.parent / PLAN_FILE
    if path.name == RECIPE_FILE and saved.is_file():
        try:
            earlier = json.loads(saved.read_text(encoding="utf-8"))["plan"].get("import_dir")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            earlier = None
        if isinstance(earlier, str):
            return earlier
    return str(path.parent)


def find(target: str, import_dir: str | None, key: str = "model.target") -> str | None:
    """The problem with the module of `key` (model.target or data.target), found the way the workers
    will import it; None if found.

    Nothing is imported: the module's file is looked up in `import_dir` (the recipe's folder), the
    working directory, then sys.path, and a package's submodule in the package's folder
    (importlib.util.find_spec would run the parent package's __init__, which may import torch).
    """
    module_name = target.partition(":")[0]
    parts = module_name.split(".")
    near = [d for d in (import_dir, os.getcwd()) if d]
    places = " and ".join(dict.fromkeys(near)) + ", then PYTHONPATH and installed packages"
    spec: ModuleSpec | None = PathFinder.find_spec(parts[0], near) or _installed_spec(parts[0])
    if spec is None:
        return f"{key}: cannot import {module_name!r}: no module {parts[0]!r} in {places}"
    for i, part in enumerate(parts[1:], 1):
        locations = list(spec.submodule_search_locations or [])
        parent = ".".join(parts[:i])
        found = PathFinder.find_spec(".".join(parts[: i + 1]), locations) if locations else None
        if found is None:
            where = f"in {', '.join(locations)}" if locations else "(it is a module, not a package)"
            return f"{key}: cannot import {module_name!r}: {parent!r} has no module {part!r} {where}"
        spec = found
    if spec.origin is None or not (spec.has_location or spec.origin in ("built-in", "frozen")):
        folders = ", ".join(spec.submodule_search_locations or [])
        return (
            f"{key}: {module_name!r} is a folder without __init__.py ({folders}), not a module file;"
            " name the module file inside it"
        )
    return None


def _installed_spec(name: str) -> ModuleSpec | None:
    """A top-level module on sys.path or from an installed package's finder (editable installs)."""
    try:
        return find_spec(name)  # a top-level name: nothing runs to find it
    except (ImportError, ValueError):  # a module in sys.modules without a __spec__ (__main__)
        return None


def only_target_keys(recipe: Recipe) -> Recipe:
    """The recipe with the built-in model's keys at their defaults: a target (or model.hf) ignores them.

    launcher.recipe.rules refuses those a user wrote beside the target; what is left came from an
    `extends:` base. Resetting them keeps the vocabulary from following a base's model.name or
    model.vocab_size, and RUN_DIR/recipe.yaml (every key written out) loads again on --resume.
    """
    m = recipe.model
    defaults = {
        key: (None if key == "name" else type(m).model_fields[key].default)
        for key in ("name", *BUILT_IN_MODEL_KEYS)
    }
    return recipe.model_copy(update={"model": m.model_copy(update=defaults)})


def only_dataset_keys(recipe: Recipe) -> Recipe:
    """The recipe with the file-reading data keys at their defaults: a data.target ignores them.

    As for model.target (`only_target_keys`): those written beside it are refused by
    launcher.recipe.rules, and what is left came from an `extends:` base's files.
    """
    d = recipe.data
    defaults = {key: type(d).model_fields[key].default for key in DATASET_KEYS}
    return recipe.model_copy(update={"data": d.model_copy(update=defaults)})
