"""The `model.target` contract: where the module is imported from, what the factory is given,
which keys beside it are refused, and how a vocabulary too small for the data is reported.

The unit tests check recipes in-process; one tiny run goes through the CLI with the model's
module next to its recipe in a tmp folder, launched from the project root.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load, to_dict
from tests.runs import FAST_USER_MODEL, explain, mplaunch, records, write_recipe

CPU = Hardware(cpu_count=2)

MODEL_FILE = """
import json, os
from torch import nn


class Tiny(nn.Module):
    def __init__(self, vocab_size, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, labels):
        logits = self.head(self.embed(input_ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def build(vocab_size, hidden=8, record=None):
    if record:
        with open(record, "w") as f:
            json.dump({"vocab_size": vocab_size, "cwd": os.getcwd()}, f)
    return Tiny(vocab_size, hidden)


def fixed(hidden=8):
    return Tiny(50, hidden)  # takes no vocab_size: 50 rows whatever the data


def anything(**kwargs):
    return kwargs


class WithPositions(Tiny):
    def __init__(self, vocab_size, hidden):
        super().__init__(vocab_size, hidden)
        self.positions = nn.Embedding(8, hidden)  # fewer rows than the vocabulary: fine

    def forward(self, input_ids, labels):
        import torch

        h = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def positions(vocab_size):
    return WithPositions(vocab_size, 8)
"""


def _user_recipe(folder: Path, name: str, model: dict, *layers: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_models.py").write_text(MODEL_FILE)
    base = {"model": {"name": None, "target": "my_models:build", **model}}
    return write_recipe(folder, name, FAST_USER_MODEL, base, *layers)


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *args])
    return code, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------- keys beside a target


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
    recipe = _user_recipe(tmp_path, "keys", layer)
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
    recipe = _user_recipe(tmp_path, "inherited", {"dropout": 0.1, "vocab_size": None})
    code, lines = _check(capsys, str(recipe))
    assert (code, lines) == (0, []), lines
    # The base's own value given again on the command line changes nothing either.
    assert _check(capsys, str(recipe), "model.size=tiny") == (0, [])


def test_a_target_runs_saved_recipe_loads_again(tmp_path: Path) -> None:
    """RUN_DIR/recipe.yaml writes every key out; for a target the plan leaves them at their defaults."""
    plan = resolve(load(_user_recipe(tmp_path, "saved", {})), CPU)
    assert (plan.recipe.model.name, plan.recipe.model.size) == (None, "base")  # the base's tiny is dropped
    saved = tmp_path / "saved-again.yaml"
    saved.write_text(yaml.safe_dump(to_dict(plan.recipe), sort_keys=False))
    assert load(saved).model.target == "my_models:build"


# --------------------------------------------------------------------------- finding the module


def test_a_missing_target_module_is_refused_at_check_naming_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _user_recipe(tmp_path, "missing", {"target": "no_such_module:build"})
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
    recipe = _user_recipe(tmp_path, "where", {"target": target})
    code, lines = _check(capsys, str(recipe))
    assert code == 2
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_check_finds_the_module_next_to_the_recipe_without_importing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "recipes"
    recipe = _user_recipe(folder, "found", {"target": "heavy.models:build"})
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
    first = resolve(load(_user_recipe(tmp_path / "project", "first", {}, synthetic)), CPU)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(first.to_json())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(first.recipe), sort_keys=False))
    again = resolve(load(run_dir / "recipe.yaml"), CPU)
    assert again.import_dir == first.import_dir == str((tmp_path / "project").resolve())


# --------------------------------------------------------------------------- the vocabulary


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
    recipe = _user_recipe(tmp_path, "small", {"kwargs": {"vocab_size": 50}}, {"data": {"tokenizer": "tok"}})
    code, lines = _check(capsys, str(recipe))
    assert code == 2
    assert len(lines) == 1, lines
    assert "model.kwargs.vocab_size: 50 is smaller than the data's vocabulary 100" in lines[0]
    # Larger (padded embeddings) is allowed, and is the model's vocabulary.
    plan = resolve(load(recipe, ["model.kwargs.vocab_size=128"]), CPU)
    assert plan.vocab_size == 128


def test_the_vocabulary_of_a_target_on_synthetic_data(tmp_path: Path) -> None:
    synthetic = {"data": {"kind": "synthetic", "paths": []}}
    given = resolve(load(_user_recipe(tmp_path, "given", {"kwargs": {"vocab_size": 512}}, synthetic)), CPU)
    assert (given.vocab_size, given.vocab_source.split(";")[0]) == (512, "model.kwargs.vocab_size")
    assert resolve(load(_user_recipe(tmp_path, "default", {}, synthetic)), CPU).vocab_size == 30522
    with pytest.raises(Exception, match="model.kwargs.vocab_size: expected a whole number"):
        resolve(load(_user_recipe(tmp_path, "bad", {"kwargs": {"vocab_size": "big"}}, synthetic)), CPU)


@pytest.fixture
def import_hygiene(monkeypatch: pytest.MonkeyPatch) -> object:
    """models.build puts the import folder on sys.path and the module in sys.modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("my_models", None)


@pytest.mark.usefixtures("import_hygiene")
def test_an_embedding_too_small_for_the_first_batch_is_one_clear_error(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from launcher.plan.targets import takes
    from launcher.recipe.schema import Model
    from launcher.worker.models import ModelError, build

    (tmp_path / "my_models.py").write_text(MODEL_FILE)
    model = build(Model(name=None, target="my_models:fixed"), None, 300, str(tmp_path))
    ids = torch.full((2, 4), 299)
    with pytest.raises(ModelError, match=r"embedding 'embed' has 50 rows but the first batch holds id 299;"):
        model(input_ids=ids, labels=ids)
    # The input embedding must cover the vocabulary even when the first batch's ids fit.
    model = build(Model(name=None, target="my_models:fixed"), None, 300, str(tmp_path))
    small = torch.full((2, 4), 7)
    with pytest.raises(
        ModelError, match=r"'embed' has 50 rows but it embeds input_ids; .* vocabulary is 300"
    ):
        model(input_ids=small, labels=small)
    with_positions = build(Model(name=None, target="my_models:positions"), None, 300, str(tmp_path))
    assert torch.isfinite(with_positions(input_ids=small, labels=small))
    # A factory that takes vocab_size (or **kwargs) is given the run's; one that does not is not.
    built = build(Model(name=None, target="my_models:build"), None, 300, str(tmp_path))
    assert built.embed.num_embeddings == 300
    loss = built(input_ids=ids, labels=ids)
    assert torch.isfinite(loss)
    assert not built.embed._forward_pre_hooks  # checked once, then gone
    assert build(Model(name=None, target="my_models:build", kwargs={"vocab_size": 400}), None, 300, None)
    mod = __import__("my_models")
    assert [takes(f, "vocab_size") for f in (mod.build, mod.fixed, mod.anything)] == [True, False, True]


# --------------------------------------------------------------------------- a real run


def test_a_factory_next_to_its_recipe_gets_the_runs_vocabulary(tmp_path: Path) -> None:
    """Launched from the project root, the recipe and its model and data in a folder of their own."""
    folder = tmp_path / "project"
    folder.mkdir()
    words = [f"word{i}" for i in range(60)]
    rng = random.Random(0)
    (folder / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)) + "\n"
    )
    record = tmp_path / "seen.json"
    recipe = _user_recipe(
        folder,
        "mine",
        {"kwargs": {"record": str(record)}},
        {
            "data": {"kind": "text", "paths": ["corpus.txt"]},
            "backend": "accelerate",
            "zero": {"stage": 0},
            "launch": {"nproc_per_node": 1},
            "train": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 8},
        },
    )
    result = mplaunch(str(recipe), timeout=300, env={"MPLAUNCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, explain(result)
    plan = json.loads((folder / "runs" / "mine" / "plan.json").read_text())["plan"]
    seen = json.loads(record.read_text())
    assert seen["vocab_size"] == plan["vocab_size"] < 8192  # the trained tokenizer's exact size
    assert "tokenizer" in plan["vocab_source"]
    assert plan["import_dir"] == str(folder.resolve())
    assert Path(seen["cwd"]) != folder  # not imported from the working directory
    assert any(r["step"] == 2 for r in records(folder / "runs" / "mine", "train"))
