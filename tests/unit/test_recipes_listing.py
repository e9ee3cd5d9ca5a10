"""`mplaunch recipes`: every shipped recipe's whole first sentence, in aligned columns, at any width."""

from __future__ import annotations

import re

import pytest

from launcher import cli
from launcher.recipe.files import RECIPES_DIR


@pytest.mark.parametrize("columns", [200, 100, 60, 40])
def test_the_recipe_list_shows_whole_first_sentences_aligned(
    columns: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) < columns for line in lines), "a line is wider than the terminal"
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    starts = [
        i for i, line in enumerate(lines) if line.split(" ", 1)[0] in names and not line.startswith(" ")
    ]
    assert [lines[i].split(" ", 1)[0] for i in starts] == names
    for i, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        name = lines[i].split(" ", 1)[0]
        shown = " ".join(" ".join(lines[i:end]).split()[1:])
        comment = " ".join(
            line.lstrip("#").strip()
            for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
            if line.startswith("#")  # the leading comment block (recipes start with one)
        )
        first = re.split(r"(?<=[.!?])\s+", comment, maxsplit=1)[0]
        assert shown == " ".join(first.split()), name
    # Beside the names, every description starts in one column.
    columns_at = {len(lines[i]) - len(lines[i].split(" ", 1)[1].lstrip()) for i in starts if " " in lines[i]}
    assert len(columns_at) <= 1
