"""Verified checkpoints: every file checksummed in the manifest, bad checkpoints skipped for older
ones (and kept as corrupt-step-N), pruning that deletes only its own names, and parameters that
must be finite before a step is sealed.

These tests break the checkpoints of real 2-rank runs of the tiny recipe as a user would, through
`mplaunch`. Checkpoint directories alone are tested in tests/unit/test_checkpoint_integrity.py, the
checkpointer in one process in tests/worker/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.rundir import checkpoint
from tests.checkpoint_state import assert_bitwise_equal
from tests.faults import flip_bytes, truncate
from tests.runs import FAST, FAST_USER_MODEL, explain, losses, mplaunch, records, write_recipe

# --------------------------------------------------------------------------- real runs, broken checkpoints

STEPS = 4
MODEL_FILE = "deepspeed/mp_rank_00_model_states.pt"
SHARD_1 = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
SHARED = {".tmp-important/data": "precious", "notes.txt": "precious", "step-important/data": "precious"}


@pytest.fixture(autouse=True)
def _deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which sets these on import.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, run directory) of a finished 4-step run with checkpoints at steps 2 and 4, kept in a
    checkpoint.dir it shares with files of someone else's; every test breaks a copy of it."""
    tmp = tmp_path_factory.mktemp("integrity")
    layer = {"train": {"max_steps": STEPS}, "checkpoint": {"every_steps": 2, "keep": 3, "dir": "shared"}}
    recipe = write_recipe(tmp, "base", FAST, layer)
    run_dir = tmp / "runs" / "base"
    for name, text in SHARED.items():
        (run_dir / "shared" / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "shared" / name).write_text(text)
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    assert sorted(p.name for p in (run_dir / "shared").glob("step-0*")) == ["step-00000002", "step-00000004"]
    return recipe, run_dir


def _copy(base: tuple[Path, Path], name: str) -> Path:
    run_dir = base[1].parent / name
    shutil.copytree(base[1], run_dir)
    (run_dir / "FINISHED").unlink()  # so that the same recipe trains again from its checkpoints
    return run_dir


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "shared" / f"step-{step:08d}"


def _resume(base: tuple[Path, Path], name: str, *overrides: str) -> subprocess.CompletedProcess:
    return mplaunch(str(base[0]), f"name={name}", *overrides)


def _warnings(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def _assert_shared_files_survive(run_dir: Path) -> None:
    for name, text in SHARED.items():
        assert (run_dir / "shared" / name).read_text() == text, name


@pytest.mark.slow
def test_flipped_bytes_in_the_newest_model_file_fall_back_to_the_older_checkpoint(
    base: tuple[Path, Path],
) -> None:
    run_dir = _copy(base, "flipped")
    flip_bytes(_ckpt(run_dir, 4) / MODEL_FILE)
    result = _resume(base, "flipped", "checkpoint.keep=1")
    assert result.returncode == 0, explain(result)
    said = _warnings(result.stderr, "failed verification")
    assert len(said) == 1, explain(result)
    assert "checkpoint step-00000004 failed verification on rank " in said[0]
    assert f"{MODEL_FILE}: crc32 " in said[0]
    assert ", expected " in said[0]
    assert "training from step 2 to 4" in result.stdout
    # Steps 3 and 4 again, exactly as the uninterrupted run had them.
    assert losses(run_dir) == losses(base[1])
    assert_bitwise_equal(_ckpt(run_dir, 4), _ckpt(base[1], 4))
    # keep=1 pruned step 2 once the new step 4 was sealed; the corrupt one and the neighbours stay.
    assert sorted(p.name for p in (run_dir / "shared").iterdir() if not p.name.startswith(".tmp-imp")) == [
        "corrupt-step-00000004",
        "latest",
        "notes.txt",
        "step-00000004",
        "step-important",
    ]
    _assert_shared_files_survive(run_dir)


@pytest.mark.slow
def test_a_truncated_model_file_is_skipped_by_the_launcher_and_the_workers(base: tuple[Path, Path]) -> None:
    run_dir = _copy(base, "truncated")
    truncate(_ckpt(run_dir, 4) / MODEL_FILE)
    result = _resume(base, "truncated")
    assert result.returncode == 0, explain(result)
    skipped = _warnings(result.stderr, "ignored, trying an older one")
    assert len(skipped) == 1, explain(result)
    assert f"step-00000004: {MODEL_FILE} is " in skipped[0]
    assert "resuming from step 2" in result.stdout
    assert losses(run_dir) == losses(base[1])
    assert (run_dir / "shared" / "corrupt-step-00000004").is_dir()
    _assert_shared_files_survive(run_dir)


@pytest.mark.slow
def test_with_no_intact_checkpoint_left_the_run_refuses_in_one_line(base: tuple[Path, Path]) -> None:
    run_dir = _copy(base, "refused")
    (_ckpt(run_dir, 4) / SHARD_1).unlink()  # one rank's optimizer shard deleted
    flip_bytes(_ckpt(run_dir, 2) / SHARD_1)
    before = records(run_dir, "train")
    result = _resume(base, "refused")
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr
    failed = _warnings(result.stderr, "the run failed on")
    assert len(failed) == 1
    assert "passed verification" in failed[0]
    assert (
        "nothing was trained, and running the same recipe again is refused until they are moved away"
        in failed[0]
    )
    assert len(_warnings(result.stderr, "failed verification on rank")) == 2
    # What the launcher adds about running again agrees with the workers' line.
    assert "resumes from the latest" not in result.stderr, explain(result)
    again = _warnings(result.stderr, "running the same recipe again")
    assert len(again) >= 2, explain(result)
    assert all("is refused until they are moved away" in line for line in again), explain(result)
    assert records(run_dir, "train") == before  # no fresh start over the user's checkpoints
    corrupt = ["corrupt-step-00000002", "corrupt-step-00000004"]
    assert sorted(p.name for p in (run_dir / "shared").glob("corrupt-*")) == corrupt
    # Running it again is refused before any worker starts, in one line, touching nothing.
    result = _resume(base, "refused")
    assert result.returncode == 2, explain(result)
    assert result.stderr.strip().splitlines() == [
        f"error: {run_dir / 'shared'}: no checkpoint passed verification ({', '.join(corrupt)}, kept for "
        "inspection); nothing was started, and the run is refused until they are moved away "
        "(checkpoint.resume=never starts from step 0 beside them; another name starts a new run)"
    ], explain(result)
    assert records(run_dir, "train") == before
    assert not list((run_dir / "shared").glob("step-0*"))


@pytest.mark.slow
def test_a_random_fault_in_a_random_checkpoint_ends_in_a_correct_resume(base: tuple[Path, Path]) -> None:
    rng = random.Random(7)
    run_dir = _copy(base, "fault")
    step = rng.choice([2, 4])
    manifest = checkpoint.read_manifest(_ckpt(run_dir, step))
    name = rng.choice([e["path"] for e in manifest["files"]])
    fault = rng.choice(["flip", "truncate", "delete"])
    target = _ckpt(run_dir, step) / name
    if fault == "flip":
        flip_bytes(target, rng)
    elif fault == "truncate":
        truncate(target)
    else:
        target.unlink()
    result = _resume(base, "fault")
    assert result.returncode == 0, (step, name, fault, explain(result))
    assert f"finished {STEPS} steps" in result.stdout
    assert losses(run_dir) == losses(base[1]), (step, name, fault)


def _never_sealed(tmp: Path, name: str, *layers: dict, fast: dict = FAST) -> tuple[str, Path]:
    result = mplaunch(str(write_recipe(tmp, name, fast, *layers)))
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr
    failed = _warnings(result.stderr, "the run failed on")
    assert len(failed) == 1, explain(result)
    return failed[0], tmp / "runs" / name / "checkpoints"


@pytest.mark.slow
def test_absurd_weights_from_a_huge_learning_rate_are_never_sealed(tmp_path: Path) -> None:
    # Step 1's weights are about 1e36: finite in fp32, the loss of step 1 is still fine.
    layer = {"optimizer": {"lr": 1e37}, "train": {"max_steps": 2}, "checkpoint": {"every_steps": 1}}
    line, root = _never_sealed(tmp_path, "huge", layer)
    assert "the parameters after step 1 are not finite" in line
    assert "nothing was saved and no earlier checkpoint exists" in line
    assert not list(root.glob("step-*"))
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_nan_weights_behind_a_finite_loss_are_never_sealed(tmp_path: Path) -> None:
    poisoned = {
        "backend": "accelerate",
        # DDP: the parameters are the optimizer's own. FSDP2 poisons only the gathered copy, which the
        # fp32 shards (the checkpoint's content) never see.
        "zero": {"stage": 0},
        "model": {
            "name": None,
            "target": "poison_model:build",
            "kwargs": {"vocab_size": 512, "poison_step": 4, "accum": 2},
        },
        "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        "train": {"max_steps": 4},
        "checkpoint": {"every_steps": 2},
    }
    line, root = _never_sealed(tmp_path, "poisoned", poisoned, fast=FAST_USER_MODEL)
    assert "the parameters after step 4 are not finite" in line
    assert "the last complete checkpoint, step 2, is kept" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert os.path.getsize(root / "latest") > 0
