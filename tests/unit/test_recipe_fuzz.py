"""Property test: malformed recipes always end in exit 2 with one `error: PATH: ...` line per problem.

Each generated recipe starts valid, gets a few random edits that may or may
not be valid (wrong types, junk values, nested junk, unicode), and then at
least one edit that is certainly invalid (an unknown key somewhere, a section
that is not a mapping, a mapping where a value belongs).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from launcher import cli
from launcher.recipe.schema import Recipe, all_keys

MINIMAL: dict[str, Any] = {"name": "fuzz", "model": {"name": "tiny-mlp"}, "train": {"micro_batch_size": 2}}


def _sections(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], type[BaseModel]]:
    out = {prefix: model}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out.update(_sections(sub, (*prefix, name)))
    return out


SECTIONS = _sections(Recipe)
LEAVES = [tuple(k.split(".")) for k in all_keys()]
MAPPING_LEAVES = {
    ("model", "kwargs"), ("model", "config"), ("data", "kwargs"), ("slurm", "env"), ("logging", "mlflow", "tags"),
}  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # nan and inf included
    st.text(max_size=20),
    st.sampled_from(["yes", "off", "8", "1e-4", "auto", "fp16", "", "~", "0x10", "2:30"]),
)
junk = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=6,
)
key_text = st.one_of(
    st.text(min_size=1, max_size=15),
    st.sampled_from(["int", "str", "[key]", "literal['auto']", "ñame", "trian"]),
)


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[tuple[str, ...], Any]:
    section = draw(st.sampled_from(sorted(SECTIONS)))
    fields = SECTIONS[section].model_fields
    key = draw(key_text.filter(lambda k: k not in fields))
    return (*section, key), draw(junk)


@st.composite
def non_mapping_section(draw: st.DrawFn) -> tuple[tuple[str, ...], Any]:
    section = draw(st.sampled_from(sorted(s for s in SECTIONS if s)))
    return section, draw(junk.filter(lambda v: v is not None and not isinstance(v, dict)))


@st.composite
def mapping_at_a_leaf(draw: st.DrawFn) -> tuple[tuple[str, ...], Any]:
    leaf = draw(st.sampled_from([leaf for leaf in LEAVES if leaf not in MAPPING_LEAVES]))
    return leaf, draw(st.dictionaries(st.text(max_size=8), junk, max_size=3))


@st.composite
def any_leaf(draw: st.DrawFn) -> tuple[tuple[str, ...], Any]:
    return draw(st.sampled_from(LEAVES)), draw(junk)


certainly_invalid = st.one_of(unknown_key(), non_mapping_section(), mapping_at_a_leaf())


def put(doc: dict[Any, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


@st.composite
def malformed_recipes(draw: st.DrawFn) -> dict[Any, Any]:
    doc = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for path, value in draw(st.lists(any_leaf(), max_size=3)):
        put(doc, path, value)
    for path, value in draw(st.lists(certainly_invalid, min_size=1, max_size=3)):
        put(doc, path, value)
    return doc


def _key_head(key: Any) -> str:
    """How a top-level key starts the problem's path: as written, or escaped when it holds control characters."""
    if not isinstance(key, str):
        return {None: "null", True: "true", False: "false"}.get(key, str(key))
    return key if key.isprintable() else repr(key)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=malformed_recipes())
def test_malformed_recipes_fail_cleanly(recipe_file: Path, doc: dict[Any, Any]) -> None:
    recipe_file.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check", str(recipe_file)])  # any exception fails the test
    lines = err.getvalue().splitlines()
    assert code == 2, (doc, lines)
    assert out.getvalue() == ""
    assert lines
    heads = [_key_head(k) for k in doc]
    for line in lines:
        if line.startswith("error: not checked until the problems above are fixed: "):
            continue  # the rounds that wait on a refused value, named once
        assert line.startswith("error: "), line
        # The recipe's own problems carry its file; the plan's (checked in the same pass) do not.
        problem = line.removeprefix(f"error: {recipe_file}: ").removeprefix("error: ")
        assert any(problem.startswith(head) for head in heads), (line, heads)  # names a key path
        assert ": " in problem.removeprefix(next(h for h in heads if problem.startswith(h))), line
