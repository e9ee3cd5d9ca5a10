"""A user's data.target, checked without importing it: the keys refused beside it and the vocabulary it is given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from tests.user_code import MODULE, VOCAB, data_recipe

CPU = Hardware(cpu_count=2)


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_dataset_beside_its_recipe_passes_check_without_being_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The base (bert_tiny.yaml, from bert.yaml) names data.kind text and data.paths: inherited, not refused.
    recipe = data_recipe(tmp_path, "ok")
    assert _check(capsys, str(recipe)) == (0, [])
    assert MODULE not in sys.modules
    plan = resolve(load(recipe), CPU)
    assert (plan.recipe.data.kind, plan.data_paths, plan.vocab_size) == ("synthetic", (), VOCAB)
    assert plan.import_dir == str(tmp_path.resolve())
    assert f"data       {MODULE}:arithmetic(seq_len=32, vocab_size=64" in plan.describe()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.paths=[corpus.txt]"], "data.paths"),
        (["data.kind=jsonl"], "data.kind"),
        (["data.text_field=body"], "data.text_field"),
        (["data.label_field=y"], "data.label_field"),
        (["data.prompt_field=q"], "data.prompt_field"),
        (["data.response_field=a"], "data.response_field"),
        (["data.pack=false"], "data.pack"),
        (["data.num_samples=64"], "data.num_samples"),
        (["data.kwargs.seq_len=8"], "data.kwargs.seq_len"),
        (["data.kwargs.seed=3"], "data.kwargs.seed"),
        (["data.target=no_such_module:build"], "data.target: cannot import 'no_such_module'"),
        # The vocabulary must be known without training a tokenizer on files.
        (["model.kwargs={}"], "data.target: the vocabulary must be known"),
        (["model.name=gpt2-lm", "model.target=null", "model.kwargs={}"], "model.vocab_size"),
    ],
)
def test_a_key_that_does_nothing_beside_data_target_is_one_line_at_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], key: str
) -> None:
    recipe = data_recipe(tmp_path, "refused")
    code, lines = _check(capsys, str(recipe), *overrides)
    assert code == 2
    assert len(lines) == 1, lines
    assert key in lines[0]


def test_the_vocabulary_of_a_dataset_comes_from_the_model_or_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = data_recipe(tmp_path, "vocab")
    built_in = ["model.name=gpt2-lm", "model.target=null", "model.kwargs={}", "model.vocab_size=100"]
    assert resolve(load(recipe, built_in), CPU).vocab_size == 100
    (tmp_path / "tok").mkdir()
    tokenizer = {"model": {"vocab": {f"t{i}": i for i in range(40)}}, "added_tokens": []}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert resolve(load(recipe, ["model.kwargs={}", "data.tokenizer=tok"]), CPU).vocab_size == 40
    code, lines = _check(capsys, str(recipe), "data.kwargs.vocab_size=9")
    assert code == 2
    assert len(lines) == 1
    assert "data.kwargs.vocab_size" in lines[0]


def test_data_kwargs_without_a_target_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = data_recipe(tmp_path, "stray", {"data": {"target": None, "task": "auto"}})
    code, lines = _check(capsys, str(recipe), "data.kwargs.n=1")
    assert code == 2, lines
    assert "data.kwargs: only used with data.target" in lines[0]
    # Every round at once: the plan's check of the target's vocabulary may follow, nothing else.
    assert all(line.startswith("error: model.kwargs.vocab_size: 64 is smaller") for line in lines[1:]), lines
