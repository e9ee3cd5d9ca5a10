"""logging.trackers and its settings in the recipe, and what `check` says of them (the W&B mode and
MLflow store a run picks: tests/worker/test_trackers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.errors import UserError
from launcher.plan import extras
from launcher.plan.hardware import Hardware
from launcher.recipe.schema import load, to_dict, validate
from launcher.recipe.sections import Recipe
from launcher.run import launch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "bert_tiny.yaml")


def recipe(**logging: Any) -> Recipe:
    return validate({"name": "t", "logging": logging}, "test")


def refusal(*overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        load(TINY, list(overrides))
    return str(caught.value)


# --------------------------------------------------------------------------- the recipe


def test_tensorboard_alone_is_the_default_and_the_settings_have_theirs() -> None:
    r = recipe()
    assert r.logging.enabled_trackers == ("tensorboard",)
    assert (r.logging.wandb.project, r.logging.wandb.mode, r.logging.wandb.name) == ("mplaunch", "auto", None)
    assert (r.logging.mlflow.tracking_uri, r.logging.mlflow.experiment) == (None, None)


@pytest.mark.parametrize(
    ("logging", "enabled"),
    [
        ({"trackers": ["wandb", "mlflow"]}, ("wandb", "mlflow")),
        ({"trackers": ["mlflow", "tensorboard"]}, ("mlflow", "tensorboard")),
        ({"tensorboard": False}, ()),
        ({"tensorboard": False, "trackers": ["wandb"]}, ("wandb",)),
        ({"tensorboard": True, "trackers": ["tensorboard", "wandb"]}, ("tensorboard", "wandb")),
        ({"trackers": []}, ()),
    ],
)
def test_the_trackers_a_run_gets_and_the_resolved_recipe_validates_again(
    logging: dict[str, Any], enabled: tuple[str, ...]
) -> None:
    r = recipe(**logging)
    assert r.logging.enabled_trackers == enabled
    # plan.json holds every key: what a worker validates again must say the same
    assert validate(to_dict(r), "plan.json").logging.enabled_trackers == enabled


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (("logging.tensorboard=false", "logging.trackers=[tensorboard,wandb]"), "lists"),
        (("logging.tensorboard=true", "logging.trackers=[wandb]"), "leaves out"),
    ],
)
def test_tensorboard_false_beside_trackers_that_list_it_is_one_line_naming_both(
    overrides: tuple[str, ...], said: str
) -> None:
    message = refusal(*overrides)
    assert "\n" not in message
    assert "logging.tensorboard" in message
    assert "logging.trackers" in message
    assert f"which {said} tensorboard" in message


def test_a_tracker_listed_twice_is_refused() -> None:
    assert "wandb listed more than once" in refusal("logging.trackers=[wandb,mlflow,wandb]")


@pytest.mark.parametrize(
    ("override", "nearest"),
    [
        ("logging.trakers=[wandb]", "logging.trackers"),
        ("logging.wandb.projet=x", "logging.wandb.project"),
        ("logging.mlflow.tracking_url=x", "logging.mlflow.tracking_uri"),
    ],
)
def test_a_typo_gets_the_nearest_key(override: str, nearest: str) -> None:
    assert f"did you mean {nearest}?" in refusal(override)


def test_an_unknown_tracker_or_mode_names_the_choices() -> None:
    assert "'tensorboard', 'wandb', 'mlflow'" in refusal("logging.trackers=[neptune]")
    assert "'auto', 'online', 'offline'" in refusal("logging.trackers=[wandb]", "logging.wandb.mode=cloud")


# --------------------------------------------------------------------------- check


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=4, cpu_bf16=True)))
    monkeypatch.setattr(launch, "run", lambda plan: pytest.fail("nothing may start"))


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(["check", TINY, *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_check_names_a_missing_tracker_package_and_its_extra_in_one_line(
    capsys: pytest.CaptureFixture[str], cpu: None, lacking: Callable[..., None]
) -> None:
    lacking("wandb", "mlflow")
    code, out, err = _check(capsys, "logging.trackers=[wandb,mlflow]")
    assert (code, out) == (2, [])
    assert (
        f"error: missing package of the wandb extra: wandb (logging.trackers wandb); install it with: {extras.install_command('wandb')}"
        in err
    )
    assert (
        f"error: missing package of the mlflow extra: mlflow (logging.trackers mlflow); install it with: {extras.install_command('mlflow')}"
        in err
    )
    assert extras.install_command("mlflow").endswith("[mlflow]'")


def test_check_passes_when_the_listed_trackers_are_installed(
    capsys: pytest.CaptureFixture[str], cpu: None, lacking: Callable[..., None]
) -> None:
    lacking("mlflow")  # not listed: not needed
    code, out, _ = _check(capsys, "logging.trackers=[wandb]")
    assert code == 0
    assert out[0].startswith("ok: ")


def test_settings_of_a_tracker_that_is_not_listed_have_no_effect(
    capsys: pytest.CaptureFixture[str], cpu: None
) -> None:
    code, _, err = _check(capsys, "logging.wandb.project=p", "logging.mlflow.experiment=e")
    assert code == 0
    assert "warning: logging.wandb.project: has no effect: logging.trackers does not list wandb" in err
    assert "warning: logging.mlflow.experiment: has no effect: logging.trackers does not list mlflow" in err
    _, _, err = _check(capsys, "logging.trackers=[wandb]", "logging.wandb.project=p")
    assert not [line for line in err if "has no effect" in line]


def test_pyprojects_tracker_extras_bring_the_packages_check_looks_for() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert declared["wandb"] == ["wandb"]
    assert declared["mlflow"] == ["mlflow-skinny"]  # the client alone, imported as mlflow
    assert (extras.PACKAGES["wandb"], extras.PACKAGES["mlflow"]) == ("wandb", "mlflow")
