"""`mplaunch export` asks the backend that wrote a checkpoint to consolidate it (each backend owns its
checkpoint format); one process, no training. tests/e2e/test_export.py runs every stage for real."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.worker import backends, export
from launcher.worker.backends import accelerate as acc_backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def _plan(tmp_path: Path, backend: str) -> Plan:
    recipe = load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", f"backend={backend}"])
    return resolve(recipe, Hardware(cpu_count=2))


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS))
def test_export_consolidates_through_the_plans_backend(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module(backends.BACKENDS[backend])
    asked: list[tuple[Path, str]] = []
    weights = {"w": torch.ones(2)}

    def consolidate_fp32(directory: Path, plan: Plan) -> dict[str, torch.Tensor]:
        asked.append((directory, plan.recipe.backend))
        return weights

    monkeypatch.setattr(module, "consolidate_fp32", consolidate_fp32)
    assert export.consolidate(_plan(tmp_path, backend), tmp_path) is weights
    assert asked == [(tmp_path, backend)]


@pytest.mark.parametrize("backend", sorted(backends.BACKENDS))
def test_missing_backend_files_are_one_user_error(backend: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path}"):
        export.consolidate(_plan(tmp_path, backend), tmp_path)


def test_accelerate_reads_the_model_file_save_state_wrote(tmp_path: Path) -> None:
    state = {"lm.weight": torch.randn(3, 2), "lm.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    got = acc_backend.consolidate_fp32(tmp_path, _plan(tmp_path, "accelerate"))
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_file_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot consolidate the weights") as err:
        export.consolidate(_plan(tmp_path, "accelerate"), tmp_path)
    assert "\n" not in str(err.value)
