"""One path rule: a relative logging.dir the recipe sets is relative to the recipe's folder, as
data.paths and model.hf are, whether the recipe file or a `key=value` override sets it; left
unset it is `runs` in the working directory. The dry run shows the resolved run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.rundir.layout import RunDir

RECIPE = """\
name: t
model: {name: tiny-mlp}
data: {kind: synthetic}
train: {micro_batch_size: 2, global_batch_size: 2, max_steps: 2}
launch: {device: cpu, nproc_per_node: 1}
"""


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the recipe's folder, the working directory): two different folders."""
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "elsewhere"
    recipe_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return recipe_dir, cwd


def _plan_of(recipe: Path, *overrides: str) -> str:
    return resolve(load(recipe, overrides), Hardware(cpu_count=2)).run_dir


def test_a_logging_dir_in_the_recipe_is_relative_to_its_folder(folders: tuple[Path, Path]) -> None:
    recipe_dir, _ = folders
    (recipe_dir / "r.yaml").write_text(RECIPE + "logging: {dir: out}\n")
    assert _plan_of(recipe_dir / "r.yaml") == str(recipe_dir / "out" / "t")


def test_an_override_is_relative_to_the_recipe_folder_too(folders: tuple[Path, Path]) -> None:
    recipe_dir, _ = folders
    (recipe_dir / "r.yaml").write_text(RECIPE)
    # data.paths=... on the command line is read against the recipe's folder; so is logging.dir.
    assert _plan_of(recipe_dir / "r.yaml", "logging.dir=out2") == str(recipe_dir / "out2" / "t")


def test_unset_it_is_runs_in_the_working_directory(folders: tuple[Path, Path]) -> None:
    recipe_dir, cwd = folders
    (recipe_dir / "r.yaml").write_text(RECIPE)
    assert _plan_of(recipe_dir / "r.yaml") == str(cwd / "runs" / "t")


def test_an_absolute_logging_dir_is_taken_as_written(folders: tuple[Path, Path], tmp_path: Path) -> None:
    recipe_dir, _ = folders
    (recipe_dir / "r.yaml").write_text(RECIPE)
    assert _plan_of(recipe_dir / "r.yaml", f"logging.dir={tmp_path / 'abs'}") == str(tmp_path / "abs" / "t")


def test_the_dry_run_shows_the_resolved_run_dir(
    folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_dir, _ = folders
    (recipe_dir / "r.yaml").write_text(RECIPE + "logging: {dir: out}\n")
    assert cli.main([str(recipe_dir / "r.yaml"), "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run dir"))
    assert f"{recipe_dir / 'out' / 't'} (logging.dir out relative to the recipe's folder)" in row


def test_a_run_directory_s_saved_recipe_names_it_from_anywhere(folders: tuple[Path, Path]) -> None:
    """RUN_DIR/recipe.yaml holds the absolute logging.dir, so `--resume RUN_DIR` and Slurm's plan
    find the same run directory from any working directory."""
    from launcher.run import preflight

    recipe_dir, _ = folders
    (recipe_dir / "r.yaml").write_text(RECIPE + "logging: {dir: out}\n")
    plan = resolve(load(recipe_dir / "r.yaml"), Hardware(cpu_count=2))
    preflight.prepare_run_dir(plan)
    saved = RunDir.from_plan(plan).recipe_file
    assert load(saved).logging.dir == str(recipe_dir / "out")
    assert resolve(load(saved), Hardware(cpu_count=2)).run_dir == plan.run_dir
