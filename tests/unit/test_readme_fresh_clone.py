"""The README's set-up line installs what CI installs, and its comments are not commands (no clone made here)."""

from __future__ import annotations

import pytest

from tests.readme_steps import BLOCKS, ROOT, install_and_run, lines_of


def test_the_readme_install_commands_are_what_ci_installs() -> None:
    (line,) = [b for lang, b in BLOCKS if lang == "bash" and b.startswith("python3 -m venv")]
    installs, main_job = install_and_run(line.strip())
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    for step in installs[2:]:
        # CI's lines are the README's with -q, `python -m pip`, and the dev extra for the tests.
        package = step.removeprefix("pip install ")
        wanted = package.replace("[train,report,fp8,wandb,mlflow]", "[train,report,fp8,wandb,mlflow,dev]")
        assert f"python -m pip install -q {wanted}" in ci, step
    assert "'.[train,report,fp8,wandb,mlflow]'" in line  # report/parity: report; fp8: torchao; logging.trackers
    assert main_job.startswith("if nvidia-smi") and "mplaunch recipes/bert_tiny.yaml" in main_job


@pytest.mark.parametrize("line", ["mplaunch check x.yaml   # a comment", "  # only a comment"])
def test_comments_are_not_commands(line: str) -> None:
    assert lines_of(line) == (["mplaunch check x.yaml"] if "check" in line else [])
