"""A user's model.target, checked without importing it: the keys refused beside it, where its module is found, the vocabulary it is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load, to_dict
from tests.user_code import model_recipe

CPU = Hardware(cpu_count=2)


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("layer", "override", "key"),
    [
        ({"size": "mini"}, None, "model.size"),
        ({"dropout": 0.0}, None, "model.dropout"),
        ({"hidden_size": 64}, None, "model.hidden_size"),
        ({"vocab_size": 512}, None, "model.vocab_size"),
        ({"max_position_embeddings": 64}, None, "model.max_position_embeddings"),
        ({"name": "gpt2-lm"}, None, "model.name"),
        ({}, "model.num_layers=3", "model.num_layers"),
        ({}, "model.intermediate_size=32", "model.intermediate_size"),
        ({}, "model.num_heads=2", "model.num_heads"),
        ({}, "model.name=bert-mlm", "model.name"),
    ],
)
def test_a_built_in_key_beside_a_target_is_refused_at_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layer: dict, override: str | None, key: str
) -> None:
    recipe = model_recipe(tmp_path, "keys", layer)
    code, lines = _check(capsys, str(recipe), *([override] if override else []))
    assert code == 2
    assert len(lines) == 1, lines
    assert f"{key}:" in lines[0]
    if key != "model.name":
        assert f"model.kwargs.{key.split('.')[1]}" in lines[0]


def test_keys_a_target_ignores_but_the_user_did_not_write_beside_it_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # bert_tiny.yaml (the base) sets model.name and model.size; name: null and a default are fine.
    recipe = model_recipe(tmp_path, "inherited", {"dropout": 0.1, "vocab_size": None})
    code, lines = _check(capsys, str(recipe))
    assert (code, lines) == (0, []), lines
    # The base's own value given again on the command line changes nothing either.
    assert _check(capsys, str(recipe), "model.size=tiny") == (0, [])


def test_a_target_runs_saved_recipe_loads_again(tmp_path: Path) -> None:
    """RUN_DIR/recipe.yaml writes every key out; for a target the plan leaves them at their defaults."""
    plan = resolve(load(model_recipe(tmp_path, "saved", {})), CPU)
    assert (plan.recipe.model.name, plan.recipe.model.size) == (None, "base")  # the base's tiny is dropped
    saved = tmp_path / "saved-again.yaml"
    saved.write_text(yaml.safe_dump(to_dict(plan.recipe), sort_keys=False))
    assert load(saved).model.target == "my_models:build"


def test_a_missing_target_module_is_refused_at_check_naming_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = model_recipe(tmp_path, "missing", {"target": "no_such_module:build"})
    code, lines = _check(capsys, str(recipe))
    assert code == 2
    assert len(lines) == 1, lines
    assert "model.target: cannot import 'no_such_module'" in lines[0]
    assert str(tmp_path) in lines[0]  # the recipe's folder


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("my_models.sub:build", "'my_models' has no module 'sub' (it is a module, not a package)"),
        ("pkg.nope:build", "'pkg' has no module 'nope' in"),
        ("folder:build", "'folder' is a folder without __init__.py"),
    ],
)
def test_a_module_that_cannot_be_found_as_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, expected: str
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "folder").mkdir()
    recipe = model_recipe(tmp_path, "where", {"target": target})
    code, lines = _check(capsys, str(recipe))
    assert code == 2
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_check_finds_the_module_next_to_the_recipe_without_importing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "recipes"
    recipe = model_recipe(folder, "found", {"target": "heavy.models:build"})
    (folder / "heavy").mkdir()
    marker = tmp_path / "imported"
    (folder / "heavy" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "heavy" / "models.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    code, lines = _check(capsys, str(recipe))
    assert (code, lines) == (0, [])
    assert not marker.exists()
    plan = resolve(load(recipe), CPU)
    assert plan.import_dir == str(folder.resolve())


def test_a_resumed_run_imports_from_the_first_launchs_recipe_folder(tmp_path: Path) -> None:
    """`--resume RUN_DIR` loads RUN_DIR/recipe.yaml; the module stays next to the original recipe."""
    synthetic = {"data": {"kind": "synthetic", "paths": []}}
    first = resolve(load(model_recipe(tmp_path / "project", "first", {}, synthetic)), CPU)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(first.to_json())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(first.recipe), sort_keys=False))
    again = resolve(load(run_dir / "recipe.yaml"), CPU)
    assert again.import_dir == first.import_dir == str((tmp_path / "project").resolve())


def _tokenizer(directory: Path, size: int) -> Path:
    """A tokenizer.json of `size` ids: the plan reads only its vocabulary."""
    directory.mkdir(parents=True)
    vocab = {f"t{i}": i for i in range(size)}
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return directory


def test_a_kwargs_vocab_smaller_than_the_tokenizer_is_one_line_at_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tokenizer(tmp_path / "tok", 100)
    recipe = model_recipe(tmp_path, "small", {"kwargs": {"vocab_size": 50}}, {"data": {"tokenizer": "tok", "task": "causal-lm"}})
    code, lines = _check(capsys, str(recipe))
    assert code == 2
    assert len(lines) == 1, lines
    assert "model.kwargs.vocab_size: 50 is smaller than the data's vocabulary 100" in lines[0]
    # Larger (padded embeddings) is allowed, and is the model's vocabulary.
    plan = resolve(load(recipe, ["model.kwargs.vocab_size=128"]), CPU)
    assert plan.vocab_size == 128


def test_the_vocabulary_of_a_target_on_synthetic_data(tmp_path: Path) -> None:
    synthetic = {"data": {"kind": "synthetic", "paths": []}}
    given = resolve(load(model_recipe(tmp_path, "given", {"kwargs": {"vocab_size": 512}}, synthetic)), CPU)
    assert (given.vocab_size, given.vocab_source.split(";")[0]) == (512, "model.kwargs.vocab_size")
    assert resolve(load(model_recipe(tmp_path, "default", {}, synthetic)), CPU).vocab_size == 30522
    with pytest.raises(Exception, match="model.kwargs.vocab_size: expected a whole number"):
        resolve(load(model_recipe(tmp_path, "bad", {"kwargs": {"vocab_size": "big"}}, synthetic)), CPU)
