"""Hostile values, as a user meets them: nothing bad is sealed, nothing stops silently.

NaN gradients under a finite loss (Accelerate), a learning rate of 1e37, DeepSpeed
skipping steps in fp32, a YAML alias bomb and a data path that is a directory.
The training runs are 2-rank CPU runs of a tiny model, one per fixture.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher.errors import UserError
from launcher.recipe.files import MAX_VALUES
from launcher.recipe.schema import load
from tests.runs import FAST, FAST_USER_MODEL, TINY, explain, mplaunch, records, write_recipe

NAN_STEP = 3
GRADS_MESSAGE = f"the gradients became NaN or infinite in fp32 at step {NAN_STEP} while the loss was finite"
# Weights this large come from a blown-up update, never from training: their squares overflow fp32.
HUGE = 1e19


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad_values")


def _nan_grads(workdir: Path, backend: str) -> tuple[subprocess.CompletedProcess, Path]:
    """fp32, a checkpoint every step, gradients NaN (loss finite) at step NAN_STEP."""
    name = f"nan-grads-{backend}"
    recipe = write_recipe(
        workdir,
        name,
        FAST_USER_MODEL,
        {
            "backend": backend,
            "precision": {"dtype": "fp32"},
            "model": {
                "name": None,
                "target": "nan_grad_model:build",
                "kwargs": {"vocab_size": 512, "nan_steps": [NAN_STEP], "accum": 2},
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
            "train": {"max_steps": 8},
            "checkpoint": {"every_steps": 1},
        },
    )
    return mplaunch(str(recipe)), workdir / "runs" / name


@pytest.fixture(scope="module")
def accelerate_nan(workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    return _nan_grads(workdir, "accelerate")


@pytest.fixture(scope="module")
def deepspeed_nan(workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    return _nan_grads(workdir, "deepspeed")


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if "the run failed" in line]
    assert len(lines) == 1, explain(result)
    return lines[0]


def _sealed(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))


def _weights(checkpoint_dir: Path) -> list[torch.Tensor]:
    """The model weights a checkpoint holds (Accelerate's model file or FSDP2's DCP shards, or
    DeepSpeed's model states)."""
    accelerate = checkpoint_dir / "pytorch_model.bin"
    if (checkpoint_dir / "dcp").is_dir():
        from launcher.worker.backends import fsdp2

        state = fsdp2.consolidate_fp32(checkpoint_dir)
    elif accelerate.exists():
        state = torch.load(accelerate, map_location="cpu", weights_only=True)
    else:
        states = checkpoint_dir / "deepspeed" / "mp_rank_00_model_states.pt"
        state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return [t for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _assert_sound_checkpoints(run_dir: Path) -> None:
    for step in _sealed(run_dir):
        for w in _weights(run_dir / "checkpoints" / f"step-{step:08d}"):
            assert torch.isfinite(w).all(), f"checkpoint {step} holds non-finite weights"
            assert w.abs().max() < HUGE, f"checkpoint {step} holds weights of {w.abs().max():g}"


@pytest.mark.slow
def test_nan_gradients_under_a_finite_loss_stop_the_run_and_are_never_sealed(accelerate_nan: tuple) -> None:
    result, run_dir = accelerate_nan
    assert result.returncode == 1, explain(result)
    line = _error_line(result)
    assert GRADS_MESSAGE in line
    assert "stopped before saving" not in line
    assert "optimizer.lr" in line
    assert "Traceback" not in result.stderr
    assert _sealed(run_dir) == list(range(1, NAN_STEP)), explain(result)
    _assert_sound_checkpoints(run_dir)
    assert not (run_dir / "FINISHED").exists()


@pytest.mark.slow
def test_deepspeed_skipping_a_step_in_fp32_stops_the_run(deepspeed_nan: tuple) -> None:
    result, run_dir = deepspeed_nan
    assert result.returncode == 1, explain(result)
    line = _error_line(result)
    assert GRADS_MESSAGE in line
    assert "DeepSpeed skipped that step, and fp32 has no loss scale to lower" in line
    assert "finished" not in result.stdout
    # It stops at the first skipped step: no later step is trained or recorded.
    assert max(r["step"] for r in records(run_dir, "train")) == NAN_STEP - 1
    assert _sealed(run_dir) == list(range(1, NAN_STEP)), explain(result)
    _assert_sound_checkpoints(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["accelerate", "deepspeed"])
def test_a_huge_learning_rate_stops_the_run_and_seals_no_huge_weights(workdir: Path, backend: str) -> None:
    name = f"lr-{backend}"
    recipe = write_recipe(workdir, name, FAST, {"backend": backend, "checkpoint": {"every_steps": 1}})
    result = mplaunch(str(recipe), "optimizer.lr=1e37")
    assert result.returncode == 1, explain(result)
    line = _error_line(result)
    assert "NaN or infinite" in line or "not finite" in line, line
    assert "Traceback" not in result.stderr
    _assert_sound_checkpoints(workdir / "runs" / name)


# --------------------------------------------------------------------------- recipes


def _alias_bomb(path: Path) -> Path:
    # Nine levels of nine: 9**9 (387 million) values once every alias is expanded.
    levels = ["    l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path.write_text(
        f"extends: {TINY}\nname: bomb\nmodel:\n  name: null\n  target: spiky_model:build\n  kwargs:\n"
        + "\n".join(levels)
        + "\n"
    )
    return path


def test_a_yaml_alias_bomb_is_refused_at_check_time_in_one_line(tmp_path: Path) -> None:
    path = _alias_bomb(tmp_path / "bomb.yaml")
    started = time.perf_counter()
    with pytest.raises(UserError, match=re.escape(f"{path}: expands to more than {MAX_VALUES:,} values")):
        load(path)
    assert time.perf_counter() - started < 0.5
    for args in (["check", str(path)], [str(path), "--dry-run"]):
        result = mplaunch(*args, timeout=60)
        assert result.returncode == 2, explain(result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, explain(result)
        assert str(path) in lines[0] and f"{MAX_VALUES:,} values" in lines[0]


def test_a_data_path_naming_a_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    recipe = write_recipe(tmp_path, "dirdata", {"data": {"kind": "text", "paths": ["corpus"]}})
    result = mplaunch("check", str(recipe), timeout=60)
    assert result.returncode == 2, explain(result)
    assert f"data.paths[0]: {tmp_path / 'corpus'} is a directory" in result.stderr
    assert "not found" not in result.stderr
