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


def _plan(tmp_path: Path, backend: str, stage: int = 2) -> Plan:
    recipe = load(
        ROOT / "recipes" / "bert_tiny.yaml",
        [f"logging.dir={tmp_path}", f"backend={backend}", f"zero.stage={stage}"],
    )
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
    got = acc_backend.consolidate_fp32(tmp_path, _plan(tmp_path, "accelerate", stage=0))
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_file_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot consolidate the weights") as err:
        export.consolidate(_plan(tmp_path, "accelerate", stage=0), tmp_path)
    assert "\n" not in str(err.value)


def test_accelerate_fsdp2_reads_the_model_part_of_the_dcp_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from launcher.worker.backends import fsdp2

    model = {"lm.weight": torch.randn(5, 2), "lm.bias": torch.randn(5)}
    optim = {"state": {"lm.weight": {"exp_avg": torch.randn(5, 2)}}, "param_groups": [{"lr": 0.1}]}
    # What Engine.save writes, here from one process (a run's ranks each write their shards).
    dcp.save({"model": model, "optim": optim}, checkpoint_id=tmp_path / fsdp2.DCP_DIR, no_dist=True)
    got = export.consolidate(_plan(tmp_path, "accelerate", stage=3), tmp_path)
    assert got.keys() == model.keys()  # the optimizer's state is not read
    assert all(torch.equal(got[k], model[k]) for k in model)
    assert all(v.dtype == torch.float32 for v in got.values())


def test_accelerate_fsdp2_without_a_dcp_checkpoint_is_one_user_error(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")  # a stage-0 file is not it
    with pytest.raises(UserError, match="no FSDP2 checkpoint"):
        export.consolidate(_plan(tmp_path, "accelerate", stage=3), tmp_path)
