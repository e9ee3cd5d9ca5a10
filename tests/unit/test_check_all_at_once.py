"""`mplaunch check` reports a recipe's problems in one pass: its schema, its rules (files) and its
plan (batch, data contents, model files) together; what reads a key that failed the schema is
skipped, and the last line says what (launcher.plan.resolve.plan_file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import cli
from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import plan_file
from launcher.recipe import schema
from launcher.recipe.errors import RecipeProblems
from tests.runs import ROOT

CPU = Hardware(cpu_count=2)
CORPUS = ROOT / "recipes" / "data" / "corpus.txt"
NOT_CHECKED = "error: not checked until the problems above are fixed: "


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: CPU))


def _recipe(tmp: Path, **sections: dict[str, object]) -> Path:
    body: dict[str, Any] = {
        "name": "five",
        "data": {"task": "masked-lm", "kind": "text", "paths": [str(CORPUS)], "seq_len": 32},
        "train": {"micro_batch_size": 4, "max_steps": 4},
        "precision": {"dtype": "fp32"},
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "logging": {"dir": str(tmp / "runs")},
        "model": {"size": "tiny"},
    }
    for name, section in sections.items():
        body[name] = {**body.get(name, {}), **section}
    path = tmp / "five.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _check(capsys: pytest.CaptureFixture[str], path: Path, *overrides: str) -> tuple[int, list[str]]:
    code = cli.main(["check", str(path), *overrides])
    return code, capsys.readouterr().err.splitlines()


def test_five_problems_of_three_rounds_are_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.txt").write_text("")
    path = _recipe(
        tmp_path,
        optimizer={"lrr": 0.1},  # schema: unknown keys
        data={
            "paths": ["nothere.txt", "empty.txt", str(CORPUS)]
        },  # rules: a missing file; data: an empty one
        train={"micro_batch_size": 7, "global_batch_size": 30, "max_stepz": 4},  # plan: the batch
    )
    code, err = _check(capsys, path)
    assert code == 2
    assert err == [
        f"error: {path}: optimizer.lrr: unknown key; did you mean optimizer.lr?",
        f"error: {path}: train.max_stepz: unknown key; did you mean train.max_steps?",
        f"error: {path}: data.paths[0]: file not found: {tmp_path / 'nothere.txt'}",
        "error: train.global_batch_size: 30 is not divisible by micro_batch_size 7 x world_size 2 (= 14)",
        f"error: data.paths[1]: {tmp_path / 'empty.txt'} holds no records (it is empty)",
    ]


def test_once_fixed_the_recipe_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(capsys, _recipe(tmp_path, train={"global_batch_size": 32})) == (0, [])
    assert cli.main(["check", str(_recipe(tmp_path))]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {tmp_path / 'five.yaml'} (global_batch_size 8 = ")


def test_a_value_that_failed_skips_only_the_checks_that_read_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # precision.dtype failed: the devices and precision are not judged with a default in its place,
    # but the batch, the files and the data contents are.
    path = _recipe(tmp_path, precision={"dtype": "fp4"}, data={"paths": ["nothere.txt"]},
                   train={"micro_batch_size": 7, "global_batch_size": 30})  # fmt: skip
    code, err = _check(capsys, path)
    assert code == 2
    assert err[0].startswith(f"error: {path}: precision.dtype: expected one of 'auto', ")
    assert err[1:] == [
        f"error: {path}: data.paths[0]: file not found: {tmp_path / 'nothere.txt'}",
        "error: train.global_batch_size: 30 is not divisible by micro_batch_size 7 x world_size 2 (= 14)",
        NOT_CHECKED + "the devices and precision",
    ]


def test_a_section_that_is_no_mapping_skips_what_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _recipe(tmp_path, data={"paths": ["nothere.txt"]})
    code, err = _check(capsys, path, "train=5")
    assert code == 2
    assert err == [
        "error: override train: expected a section (mapping of keys), got 5",
        f"error: {path}: data.paths[0]: file not found: {tmp_path / 'nothere.txt'}",
        NOT_CHECKED + "the model's keys, the batch, the data contents",
    ]


def test_the_rules_and_the_plan_judge_a_recipe_its_rules_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A rule names what the recipe says; the plan's own problems with it are true as well.
    path = _recipe(tmp_path, zero={"stage": 0, "offload_optimizer": True}, train={"global_batch_size": 30})
    code, err = _check(capsys, path)
    assert code == 2
    assert err == [
        f"error: {path}: zero.offload_optimizer: needs zero.stage >= 1, got stage 0",
        "error: train.global_batch_size: 30 is not divisible by micro_batch_size 4 x world_size 2 (= 8)",
    ]


def test_a_plan_problem_on_a_key_the_recipe_already_named_is_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The rule says data.paths[0] is missing; the data check skips that file rather than saying it again.
    path = _recipe(tmp_path, data={"paths": ["nothere.txt"]})
    code, err = _check(capsys, path)
    assert (code, err) == (2, [f"error: {path}: data.paths[0]: file not found: {tmp_path / 'nothere.txt'}"])


def test_a_launch_reports_the_recipe_round_alone(tmp_path: Path) -> None:
    # Loading alone (what a launch does before it plans) still raises every schema and rule problem at
    # once, with the recipe the plan can still judge.
    path = _recipe(tmp_path, optimizer={"lrr": 0.1}, data={"paths": ["nothere.txt"]}, zero={"stage": "two"})
    with pytest.raises(RecipeProblems) as err:
        schema.load(path)
    assert [line.split(": ", 2)[1] for line in err.value.lines] == [
        "optimizer.lrr",
        "zero.stage",
        "data.paths[0]",
    ]
    assert err.value.failed == {
        "zero.stage"
    }  # an unknown key is no failed value: leaving it out changes nothing
    assert err.value.skipped == ["the ZeRO settings"]
    stand_in = err.value.stand_in
    assert isinstance(stand_in, schema.Recipe)
    assert stand_in.zero.stage == 0


def test_plan_file_is_the_plan_when_nothing_is_wrong(tmp_path: Path) -> None:
    plan = plan_file(_recipe(tmp_path), [], CPU)
    assert (plan.batch.global_batch_size, plan.world_size) == (8, 2)
    with pytest.raises(UserError) as err:
        plan_file(_recipe(tmp_path), ["train.global_batch_size=30"], CPU)
    assert err.value.lines == [
        "train.global_batch_size: 30 is not divisible by micro_batch_size 4 x world_size 2 (= 8)"
    ]
