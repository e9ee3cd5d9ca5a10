"""The README says what is true: its test command is CI's, its mplaunch commands parse, its reference is the schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.recipe.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CODE_BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def _commands(program: str) -> list[str]:
    """Each `program ...` command in the README's code blocks (chains split at && and ;)."""
    found = []
    for block in CODE_BLOCKS:
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line)  # a trailing shell comment
            for part in re.split(r"&&|;", line):
                words = part.split()
                # `mplaunch sweep: 4 points in ...` is output the README quotes, not a command
                if words[:1] == [program] and len(words) > 1 and not words[1].endswith(":"):
                    found.append(part.strip())
    return found


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = [c.strip() for block in CODE_BLOCKS for c in re.split(r"&&|\n", block) if "pytest" in c]
    # The whole suite, then the inner loop beside it: the unit tier.
    assert commands == ["python -m pytest -q", "python -m pytest tests/unit -q"]
    assert (ROOT / "tests" / "unit").is_dir()
    command = commands[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line for line in ci if line and not line.startswith("#")]
    assert ci_commands[-1] == command  # CI ends by running exactly the README's test command
    assert f"`{command}`" in README


MPLAUNCH = _commands("mplaunch")


def test_readme_shows_mplaunch_commands() -> None:
    assert MPLAUNCH, "the README shows no mplaunch command; this test would check nothing"


@pytest.mark.parametrize("command", MPLAUNCH)
def test_readme_mplaunch_commands_parse(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = shlex.split(command)[1:]
    if argv and argv[0] in cli.VERBS and argv[0] != "check":
        pytest.skip(f"`mplaunch {argv[0]}` is not a check or a run; its own tests cover it")
    if "--slurm" in argv:
        pytest.skip("Slurm commands are covered by the Slurm tests")
    if "--resume" in argv:
        pytest.skip("needs an existing run directory; tests/e2e/test_resume.py covers --resume")
    if argv and argv[0] != "check" and "--dry-run" not in argv:
        argv.append("--dry-run")  # a run command must at least plan
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=2)))
    code = cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    problems = [line for line in err if line.startswith("error: ")]
    # On this CPU machine a dry run may show a plan it cannot run here (fp16 on
    # DeepSpeed); anything else wrong with the command is a README bug.
    assert code == 0 or all(
        p.startswith("error: this machine cannot run the plan above") for p in problems
    ), err


def test_recipe_reference_is_in_sync_with_the_schema() -> None:
    assert README.count(START) == 1
    assert README.count(END) == 1
    section = README.split(START, 1)[1].split(END, 1)[0]
    assert reference_markdown() in section, (
        "README recipe reference is stale: replace the table between the recipe-reference markers "
        "with the output of `mplaunch check --explain --markdown`"
    )
    assert README.rstrip().endswith(END)
