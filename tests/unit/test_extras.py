"""The packages of pyproject's extras a recipe needs (launcher.plan.extras), and what `check`, the dry
run, a launch and `export` say when one is missing: one line naming it and the `pip install` that
brings it, before anything starts. The workers' side is tests/e2e/test_missing_extras.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.plan import extras
from launcher.plan.hardware import Hardware
from launcher.recipe.schema import validate
from launcher.recipe.sections import Recipe
from launcher.run import export as run_export
from launcher.run import launch, start

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "bert_tiny.yaml")
TRAIN = extras.install_command("train")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_text("one two three\n")
    (tmp_path / "a.json").write_text('{"text": "one two"}\n')
    (tmp_path / "hf").mkdir()
    return tmp_path


def recipe(**sections: Any) -> Recipe:
    return validate({"name": "t", **sections}, "test")


# --------------------------------------------------------------------------- the table


def test_the_table_holds_every_package_of_pyprojects_extras() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("train", "deepspeed", "report"):
        names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in declared[extra]}
        assert names == {m for m, e in extras.PACKAGES.items() if e == extra}, extra


def _needs(r: Recipe) -> set[tuple[str, str]]:
    return {(n.module, n.reason) for n in extras.needs(r) if n.run and not n.optional}


def test_a_tiny_mlp_on_synthetic_data_needs_torch_numpy_and_its_backend(data: Path) -> None:
    quiet = {"logging": {"tensorboard": False}}
    mlp = recipe(model={"name": "tiny-mlp"}, backend="accelerate", **quiet)
    assert _needs(mlp) == {
        ("torch", "every run"),
        ("numpy", "every run"),
        ("accelerate", "backend accelerate"),
    }
    assert ("deepspeed", "backend deepspeed") in _needs(recipe(model={"name": "tiny-mlp"}, **quiet))
    assert [n.module for n in extras.needs(mlp) if n.optional] == []


def test_bert_on_text_needs_transformers_and_tokenizers_before_the_workers(data: Path) -> None:
    bert = recipe(data={"kind": "text", "paths": [str(data / "a.txt")]})
    assert _needs(bert) == {
        ("torch", "every run"),
        ("numpy", "every run"),
        ("transformers", "model.name bert-mlm"),
        ("tokenizers", "data.kind text"),
        ("deepspeed", "backend deepspeed"),
    }
    stages = {n.module: n.stage for n in extras.needs(bert)}
    assert stages["tokenizers"] == stages["numpy"] == "launcher"  # the launcher trains the tokenizer
    assert [(n.module, n.reason) for n in extras.needs(bert) if n.optional] == [
        ("tensorboard", "logging.tensorboard")
    ]


def test_an_hf_model_with_lora_on_json_needs_datasets_to_plan_and_peft(data: Path) -> None:
    r = recipe(
        model={"name": None, "hf": str(data / "hf"), "lora": {"rank": 8}},
        data={"kind": "json", "paths": [str(data / "a.json")]},
        backend="accelerate",
    )
    assert {
        ("transformers", "model.hf"),
        ("datasets", "data.kind json"),
        ("peft", "model.lora.rank 8"),
    } <= _needs(r)
    assert [n.module for n in extras.needs(r) if n.stage == "plan"] == ["datasets"]


# --------------------------------------------------------------------------- the lines


def test_one_line_per_extra_names_each_missing_package_why_and_the_install(
    data: Path, lacking: Callable[..., None]
) -> None:
    bert = recipe(data={"kind": "text", "paths": [str(data / "a.txt")]})
    lacking("numpy", "tokenizers", "deepspeed", "tensorboard")
    assert extras.problems(bert) == [
        f"missing packages of the train extra: numpy (every run), tokenizers (data.kind text); install them with: {TRAIN}",
        "missing package of the deepspeed extra: deepspeed (backend deepspeed); install it with: "
        f"{extras.install_command('deepspeed')}",
    ]
    assert "--no-build-isolation" in extras.install_command("deepspeed")  # its build imports torch (README)
    assert extras.problems(bert, up_to="launcher") == [extras.problems(bert)[0]]
    assert extras.problems(bert, up_to="plan") == []
    lacking()
    assert extras.problems(bert) == []


def test_tensorboard_missing_is_a_warning_not_a_problem(data: Path, lacking: Callable[..., None]) -> None:
    lacking("tensorboard")
    assert extras.problems(recipe()) == []
    assert extras.warnings(recipe()) == [
        "logging.tensorboard: tensorboard is not installed, so the run writes no TensorBoard logs; "
        f"install it with {TRAIN}, or set logging.tensorboard=false"
    ]
    assert extras.warnings(recipe(logging={"tensorboard": False})) == []


def test_an_export_needs_what_reads_the_checkpoint_and_writes_the_model(
    data: Path, lacking: Callable[..., None]
) -> None:
    r = recipe(
        model={"name": None, "hf": str(data / "hf"), "lora": {"rank": 8}},
        data={"kind": "json", "paths": [str(data / "a.json")]},
        backend="accelerate",
    )
    lacking("accelerate", "datasets", "tensorboard")  # the run's, not the export's
    assert extras.export_problems(r) == []
    lacking("accelerate", "peft", "transformers")
    assert extras.export_problems(r) == [
        f"missing packages of the train extra: transformers (model.hf), peft (model.lora.rank 8); install them with: {TRAIN}"
    ]


def test_installed_finds_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert extras.installed("json")
    assert not extras.installed("no_such_module_anywhere")
    monkeypatch.setitem(sys.modules, "numpy", None)  # importing it would raise ImportError
    assert not extras.installed("numpy")

    class Refuse:
        def find_spec(self, name: str, *args: object) -> None:
            if name == "yaml_hidden_here":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    assert not extras.installed("yaml_hidden_here")


def test_a_dying_process_names_the_missing_package_only_when_it_is_one() -> None:
    line = extras.import_error_line(ModuleNotFoundError("No module named 'numpy'", name="numpy"))
    assert line == f"missing package of the train extra: numpy; install it with: {TRAIN}"
    # Another version of an installed package, or a package of no extra: the error as it is.
    assert extras.import_error_line(ModuleNotFoundError("x", name="transformers.modeling_layers")) is None
    assert extras.import_error_line(ImportError("cannot import name 'X'", name="transformers")) is None
    assert extras.import_error_line(ModuleNotFoundError("x", name="my_model")) is None


# --------------------------------------------------------------------------- the install line


@pytest.mark.parametrize(
    ("source", "editable", "cwd_is_source", "expected"),
    [
        ("/src/mplaunch", True, True, "pip install -e '.[train]'"),
        ("/src/mplaunch", True, False, "pip install -e '/src/mplaunch[train]'"),
        ("/src/mplaunch", False, False, "pip install '/src/mplaunch[train]'"),
        (None, False, False, "pip install 'mplaunch[train]'"),
    ],
)
def test_the_install_line_follows_how_mplaunch_was_installed(
    monkeypatch: pytest.MonkeyPatch, source: str | None, editable: bool, cwd_is_source: bool, expected: str
) -> None:
    path = Path(source) if source else None
    monkeypatch.setattr(extras, "installed_from", lambda: (path, editable))
    monkeypatch.setattr(Path, "cwd", classmethod(lambda cls: path if cwd_is_source else Path("/elsewhere")))
    assert extras.install_command("train") == expected


class _Dist:
    def __init__(self, direct_url: dict[str, Any] | None) -> None:
        self.text = json.dumps(direct_url) if direct_url is not None else None

    def read_text(self, name: str) -> str | None:
        return self.text if name == "direct_url.json" else None


@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        ({"url": "file:///src/my%20clone", "dir_info": {"editable": True}}, (Path("/src/my clone"), True)),
        ({"url": "file:///src/clone", "dir_info": {}}, (Path("/src/clone"), False)),
        (
            {"url": "file:///w/mplaunch-0.1-py3-none-any.whl", "archive_info": {}},
            (Path("/w/mplaunch-0.1-py3-none-any.whl"), False),
        ),
        ({"url": "https://github.com/o/mplaunch", "vcs_info": {"vcs": "git"}}, (None, False)),
        (None, (None, False)),  # from an index: no direct_url.json
    ],
)
def test_where_mplaunch_was_installed_from(
    monkeypatch: pytest.MonkeyPatch, direct_url: dict[str, Any] | None, expected: tuple[Path | None, bool]
) -> None:
    monkeypatch.setattr(metadata, "distribution", lambda name: _Dist(direct_url))
    assert extras.installed_from() == expected


def test_not_installed_at_all_is_a_clone_on_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    assert extras.installed_from() == (ROOT, True)


# --------------------------------------------------------------------------- the verbs


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A 4-core CPU machine where nothing can start: the plans launch.run was given."""
    started: list[object] = []
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=4, cpu_bf16=True)))
    monkeypatch.setattr(launch, "run", lambda plan: started.append(plan) or 0)
    return started


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def test_check_refuses_a_recipe_this_machine_lacks_a_package_for(
    capsys: pytest.CaptureFixture[str], cpu: list[object], lacking: Callable[..., None]
) -> None:
    lacking("tokenizers", "deepspeed")
    code, out, err = _run(capsys, "check", TINY)
    assert (code, out) == (2, "")
    assert err == [
        f"error: missing package of the train extra: tokenizers (data.kind text); install it with: {TRAIN}",
        "error: missing package of the deepspeed extra: deepspeed (backend deepspeed); install it with: "
        f"{extras.install_command('deepspeed')}",
    ]


def test_a_launch_stops_before_the_tokenizer_and_any_worker(
    capsys: pytest.CaptureFixture[str], cpu: list[object], lacking: Callable[..., None], tmp_path: Path
) -> None:
    lacking("tokenizers")
    code, _, err = _run(capsys, TINY, f"logging.dir={tmp_path}")
    assert code == 2
    assert err == [
        f"error: missing package of the train extra: tokenizers (data.kind text); install it with: {TRAIN}"
    ]
    assert (cpu, list(tmp_path.iterdir())) == ([], [])
    lacking("peft")  # a package only the workers import
    code, _, err = _run(capsys, TINY, f"logging.dir={tmp_path}", "model.lora.rank=4", "backend=accelerate")
    assert (code, cpu) == (2, [])
    assert (
        err[-1]
        == f"error: missing package of the train extra: peft (model.lora.rank 4); install it with: {TRAIN}"
    )


def test_the_dry_run_shows_the_plan_then_exits_2(
    capsys: pytest.CaptureFixture[str], cpu: list[object], lacking: Callable[..., None]
) -> None:
    lacking("deepspeed")
    code, out, err = _run(capsys, TINY, "--dry-run")
    assert code == 2
    assert "== command ==" in out
    assert err[-1].startswith(
        "error: this machine cannot run the plan above: missing package of the deepspeed extra: deepspeed"
    )


def test_a_dry_run_of_data_read_with_datasets_needs_datasets(
    capsys: pytest.CaptureFixture[str], cpu: list[object], lacking: Callable[..., None], data: Path
) -> None:
    lacking("datasets")
    code, out, err = _run(capsys, TINY, "--dry-run", "data.kind=json", f"data.paths=[{data / 'a.json'}]")
    assert (code, out) == (2, "")
    assert err == [
        f"error: missing package of the train extra: datasets (data.kind json); install it with: {TRAIN}"
    ]


def test_check_warns_of_tensorboard_and_passes(
    capsys: pytest.CaptureFixture[str], cpu: list[object], lacking: Callable[..., None]
) -> None:
    lacking("tensorboard")
    code, out, err = _run(capsys, "check", TINY)
    assert code == 0
    assert out.startswith("ok: ")
    assert f"warning: {extras.warnings(recipe())[0]}" in err


def _run_dir(tmp_path: Path) -> Path:
    """A run directory with the plan.json a launch of the tiny BERT on text (Accelerate) writes."""
    plan = start.plan_recipe(Path(TINY), [f"logging.dir={tmp_path}", "backend=accelerate"])
    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "plan.json").write_text(plan.to_json())
    return run_dir


def test_export_refuses_before_its_process_starts(
    capsys: pytest.CaptureFixture[str],
    cpu: list[object],
    lacking: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = _run_dir(tmp_path)
    started: list[dict[str, str]] = []
    monkeypatch.setattr(
        subprocess, "run", lambda argv, env: started.append(env) or subprocess.CompletedProcess(argv, 0)
    )
    lacking("transformers", "accelerate", "datasets")  # the latter two an export never imports
    code, _, err = _run(capsys, "export", str(run_dir), "--out", str(tmp_path / "out"))
    assert (code, started) == (2, [])
    assert err == [
        f"error: missing package of the train extra: transformers (model.name bert-mlm); install it with: {TRAIN}"
    ]
    # With the packages there, the export process starts on the CPU, DeepSpeed told so (no GPU probe, no warning).
    lacking()
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert _run(capsys, "export", str(run_dir), "--out", str(tmp_path / "out"))[0] == 0
    assert started[0]["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the user's own choice stays
    assert _run(capsys, "export", str(run_dir), "--out", str(tmp_path / "out"))[0] == 0
    assert started[1]["DS_ACCELERATOR"] == "cuda"


def test_export_of_a_directory_without_a_plan_is_left_to_the_export_process(tmp_path: Path) -> None:
    run_export.require_packages(tmp_path)  # says nothing: launcher.worker.export names the problem
