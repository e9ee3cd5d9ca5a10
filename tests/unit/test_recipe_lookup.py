"""Which file a recipe name on the command line means: a file (as given, or with .yaml or .yml) wins
over a shipped recipe of the same name, one line saying so, for every verb that takes a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import cli
from launcher.analysis import parity
from launcher.plan.hardware import Hardware
from launcher.recipe.files import RECIPES_DIR
from launcher.run import start

SHIPPED_TINY = RECIPES_DIR / "bert_tiny.yaml"
NOTE = "mplaunch: bert_tiny: using ./bert_tiny.yaml (a shipped recipe has the same name: mplaunch recipes bert_tiny)"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder of the user's, CPU-only machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=4, cpu_bf16=True)))
    return tmp_path


def edited(folder: Path, name: str = "bert_tiny.yaml") -> Path:
    """An edited bert_tiny beside the user (its own name, 120 steps), extending the shipped one."""
    path = folder / name
    path.write_text(f"extends: {SHIPPED_TINY}\nname: mine\ntrain: {{max_steps: 120}}\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def test_a_file_in_the_working_folder_wins_over_the_shipped_recipe_and_says_so(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    edited(here)
    code, out, err = run(capsys, "check", "bert_tiny")
    assert code == 0
    assert out.startswith("ok: bert_tiny.yaml (")
    assert err == [NOTE]
    code, out, err = run(capsys, "bert_tiny", "--dry-run")
    assert "name: mine" in out
    assert "max_steps: 120" in out
    assert err[0] == NOTE


def test_a_yml_file_wins_too(capsys: pytest.CaptureFixture[str], here: Path) -> None:
    edited(here, "bert_tiny.yml")
    code, out, err = run(capsys, "check", "bert_tiny")
    assert (code, out.split(" (")[0]) == (0, "ok: bert_tiny.yml")
    assert err == [NOTE.replace("./bert_tiny.yaml", "./bert_tiny.yml")]


def test_a_name_typed_with_the_other_suffix_finds_the_users_file(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    edited(here)
    code, out, err = run(capsys, "check", "bert_tiny.yml")
    assert (code, out.split(" (")[0]) == (0, "ok: bert_tiny.yaml")
    assert err == [NOTE.replace("bert_tiny: using", "bert_tiny.yml: using")]


def test_a_path_always_wins_without_a_word(capsys: pytest.CaptureFixture[str], here: Path) -> None:
    edited(here)
    for given in ("bert_tiny.yaml", "./bert_tiny.yaml", str(here / "bert_tiny.yaml")):
        code, out, err = run(capsys, "check", given)
        assert (code, err) == (0, [])
        assert out.startswith(f"ok: {Path(given)} (")
    # The shipped recipe is still reachable by its path, beside the edited copy.
    code, out, err = run(capsys, "check", str(SHIPPED_TINY))
    assert (code, err) == (0, [])
    assert out.startswith(f"ok: {SHIPPED_TINY} (")


def test_an_own_recipe_with_no_shipped_namesake_is_found_quietly(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    edited(here, "mine.yaml")
    assert run(capsys, "check", "mine")[::2] == (0, [])
    (here / "recipes").mkdir()
    edited(here / "recipes")
    code, out, err = run(capsys, "check", "recipes/bert_tiny")
    assert (code, out.split(" (")[0]) == (0, "ok: recipes/bert_tiny.yaml")
    assert err == [
        "mplaunch: recipes/bert_tiny: using recipes/bert_tiny.yaml "
        "(a shipped recipe has the same name: mplaunch recipes bert_tiny)"
    ]


def test_both_suffixes_beside_each_other_is_refused(capsys: pytest.CaptureFixture[str], here: Path) -> None:
    edited(here)
    edited(here, "bert_tiny.yml")
    code, out, err = run(capsys, "check", "bert_tiny")
    assert (code, out) == (2, "")
    assert err == [
        "error: bert_tiny: both ./bert_tiny.yaml and ./bert_tiny.yml exist (hint: name the file to use)"
    ]


def test_without_a_file_the_shipped_recipe_is_used_quietly(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    code, out, err = run(capsys, "check", "bert_tiny")
    assert (code, err) == (0, [])
    assert out.startswith(f"ok: {SHIPPED_TINY} (")


def test_extends_inside_a_shipped_recipe_is_not_redirected(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    # The shipped bert_tiny extends the shipped bert.yaml, not an edited bert.yaml beside the user.
    (here / "bert.yaml").write_text("name: not-this\nbackend: nope\n")
    code, out, err = run(capsys, "check", "bert_tiny")
    assert (code, err) == (0, [])
    assert out.startswith(f"ok: {SHIPPED_TINY} (")


def test_mplaunch_recipes_name_prints_the_shipped_one_beside_a_copy(
    capsys: pytest.CaptureFixture[str], here: Path
) -> None:
    edited(here)
    code, out, err = run(capsys, "recipes", "bert_tiny")
    assert (code, out, err) == (0, SHIPPED_TINY.read_text(), [])
    assert run(capsys, "recipes", "./bert_tiny.yaml")[1] == (here / "bert_tiny.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "module", "function"),
    [
        (["bert_tiny"], start, "start"),
        (["bert_tiny", "--slurm", "--dry-run"], start, "submit"),
        (["plan", "bert_tiny"], start, "estimate"),
        (["prepare", "bert_tiny"], start, "prepare"),
        (["parity", "bert_tiny", "--steps", "3"], parity, "check"),
    ],
)
def test_every_verb_that_takes_a_recipe_resolves_it_alike(
    capsys: pytest.CaptureFixture[str],
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    module: object,
    function: str,
) -> None:
    # `check` is shown by its own line, `ok: bert_tiny.yaml (...)`, above.
    edited(here)
    given: list[object] = []
    monkeypatch.setattr(module, function, lambda *a, **k: given.append(a[0]) or 0)
    code, _, err = run(capsys, *argv)
    assert code == 0
    assert given == [Path("bert_tiny.yaml")]
    assert err == [NOTE]
