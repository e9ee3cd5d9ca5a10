"""The README as the steps a new user takes: its shell commands, the files it says to save, its snippets.

Shared by tests/unit/test_readme_fresh_clone.py (the install line is CI's) and
tests/e2e/test_readme_fresh_clone.py (every step runs in a fresh clone).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    "python -m pytest tests/unit -q": "the unit tier, a part of the test command running this test",
}


def lines_of(block: str) -> list[str]:
    """The block's commands: trailing comments and comment-only continuation lines dropped."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if line:
            out.extend(PLACEHOLDERS.get(line, [line]))
    return out


def install_and_run(line: str) -> tuple[list[str], str]:
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


def script() -> list[tuple[str, str]]:
    """(kind, text) in README order: 'run' a shell command, 'write PATH' a file, 'python' a snippet."""
    steps: list[tuple[str, str]] = []
    offset = 0
    for lang, body in BLOCKS:
        at = README.index(f"```{lang}\n{body}```", offset)
        before, offset = README[offset:at], at + len(body)
        if lang == "bash":
            for line in lines_of(body):
                if line in NOT_HERE or any(line == cmd for kind, cmd in steps if kind == "run"):
                    continue  # not here, or a command the README repeats
                if line.startswith("python3 -m venv"):
                    line = install_and_run(line)[1]
                steps.append(("run", line))
        elif (target := _named_after(lang, body, before)) is not None:
            steps.append((f"write {target}", body))
        elif lang == "python":
            steps.append(("python", body))
    return steps
