"""Recipes too big to load: a recipe that refers to itself, and the shipped ones far below the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import UserError
from launcher.recipe.files import MAX_VALUES, Loader, expanded_size
from launcher.recipe.schema import load
from tests.runs import TINY


def test_a_recipe_that_refers_to_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(f"extends: {TINY}\nname: loop\nmodel:\n  kwargs: &k {{again: *k}}\n")
    with pytest.raises(UserError, match="expands to more than"):
        load(path)


def test_the_shipped_recipes_are_far_below_the_size_limit() -> None:
    for path in TINY.parent.glob("*.yaml"):
        values, _ = expanded_size(yaml.compose(path.read_text(), Loader=Loader), {}, set())
        assert values * 100 < MAX_VALUES, path
