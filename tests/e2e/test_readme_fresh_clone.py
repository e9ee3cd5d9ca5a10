"""A fresh clone runs the README's commands in the README's order, as a new user pastes them.

The README's install commands are what `.ci/run` runs (checked here; CI installs with them before
this test runs), so the clone uses this interpreter's environment. Commands that need what a CPU
machine has not are run as far as one can be: the Slurm submission as a dry run (the live Slurm
tests submit), the GPU proof not at all (tests/e2e/test_gpu_proof.py rehearses it on the CPU).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```([a-z]*)\n(.*?)```", README, flags=re.S)

# The README's placeholder line, as the three commands a user makes of it.
PLACEHOLDERS = {
    "mplaunch recipes [NAME] [--copy PATH]": [
        "mplaunch recipes",
        "mplaunch recipes bert_tiny",
        "mplaunch recipes bert_tiny --copy new/dir/",
    ],
}
NOT_HERE = {
    "bash .ci/run": "CI itself, which is running this test",
    ". .venv/bin/activate && python -m pytest -q": "the test command, which is running this test",
}


def _lines(block: str) -> list[str]:
    """The block's commands: trailing comments and comment-only continuation lines dropped."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if line:
            out.extend(PLACEHOLDERS.get(line, [line]))
    return out


def _install_and_run(line: str) -> tuple[list[str], str]:
    """The set-up line's install steps, and the command that runs the main job."""
    parts = [p.strip() for p in line.split(" && ")]
    installs = [p for p in parts if p.startswith(("python3 -m venv", ". .venv", "pip install"))]
    return installs, " && ".join(p for p in parts if p not in installs)


def _named_after(block_lang: str, block: str, before: str) -> Path | None:
    """Where the README says to save a python or yaml example: 'NAME.py beside the recipe'."""
    if block_lang == "python":
        found = re.findall(r"`(\w+\.py)` beside the recipe", before)
        return Path("recipes") / found[-1] if found else None
    if block_lang == "yaml":
        name = re.search(r"^name: ([\w-]+)$", block, flags=re.M)
        return Path("recipes") / f"{name.group(1)}.yaml" if name else None
    return None


def _script() -> list[tuple[str, str]]:
    """(kind, text) in README order: 'run' a shell command, 'write PATH' a file, 'python' a snippet."""
    steps: list[tuple[str, str]] = []
    offset = 0
    for lang, body in BLOCKS:
        at = README.index(f"```{lang}\n{body}```", offset)
        before, offset = README[offset:at], at + len(body)
        if lang == "bash":
            for line in _lines(body):
                if line in NOT_HERE or any(line == cmd for kind, cmd in steps if kind == "run"):
                    continue  # not here, or a command the README repeats
                if line.startswith("python3 -m venv"):
                    line = _install_and_run(line)[1]
                steps.append(("run", line))
        elif (target := _named_after(lang, body, before)) is not None:
            steps.append((f"write {target}", body))
        elif lang == "python":
            steps.append(("python", body))
    return steps


def test_the_readme_install_commands_are_what_ci_installs() -> None:
    (line,) = [b for lang, b in BLOCKS if lang == "bash" and b.startswith("python3 -m venv")]
    installs, main_job = _install_and_run(line.strip())
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    for step in installs[2:]:
        # CI's lines are the README's with -q, `python -m pip`, and the dev extra for the tests.
        package = step.removeprefix("pip install ")
        wanted = package.replace("[train,report]", "[train,report,dev]")
        assert f"python -m pip install -q {wanted}" in ci, step
    assert "'.[train,report]'" in line  # `mplaunch report` and `parity` need the report extra
    assert main_job.startswith("if nvidia-smi") and "mplaunch recipes/bert_tiny.yaml" in main_job


def _run(command: str, clone: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"`{command}`:\n{out[-3000:]}"
    return out


def test_every_readme_command_works_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "mplaunch"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    bin_dir = str(Path(sys.executable).parent)  # this environment's mplaunch and python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    steps = _script()
    commands = [text for kind, text in steps if kind == "run"]
    assert len(commands) >= 20, commands  # the README's commands were found, not a handful
    outputs: dict[str, str] = {}
    for kind, text in steps:
        if kind.startswith("write "):
            (clone / kind.removeprefix("write ")).write_text(text)
            if kind.endswith(".yaml"):  # the README shows the recipe; a user then checks and runs it
                recipe = kind.removeprefix("write ")
                outputs[f"check {recipe}"] = _run(f"mplaunch check {recipe}", clone, env)
                outputs[f"run {recipe}"] = _run(f"mplaunch {recipe} train.max_steps=20", clone, env)
        elif kind == "python":
            _run(f"{sys.executable} -c {shlex.quote(text)}", clone, env)
        elif "gpu_proof.sh" in text:
            continue  # one H100/H200 run; tests/e2e/test_gpu_proof.py rehearses it on the CPU
        elif "--slurm" in text:
            outputs[text] = _run(f"{text} --dry-run", clone, env)
        else:
            outputs[text] = _run(text, clone, env)

    # What the commands left is what the README says they leave.
    assert "finished 150 steps" in outputs[commands[0]]  # the main job: bert_tiny on a CPU machine
    assert (clone / "new" / "dir" / "bert_tiny.yaml").is_file()  # --copy made the folders
    slurm = next(out for cmd, out in outputs.items() if "--slurm" in cmd)
    assert "#SBATCH --nodes=2" in slurm
    assert (clone / "runs" / "bert-tiny-mlm" / "report" / "loss.png").is_file()
    for exported in ("bert-cls", "llama-sft-lora", "bert-tiny", "bert-tiny-100"):
        assert any((clone / "exported" / exported).iterdir()), exported
    assert "finished 20 steps" in outputs["run recipes/my-lm.yaml"]
    assert "finished 20 steps" in outputs["run recipes/my-arithmetic.yaml"]


@pytest.mark.parametrize("line", ["mplaunch check x.yaml   # a comment", "  # only a comment"])
def test_comments_are_not_commands(line: str) -> None:
    assert _lines(line) == (["mplaunch check x.yaml"] if "check" in line else [])
