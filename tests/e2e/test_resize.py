"""Resume at another world size: the launcher keeps the global batch, the workers reshard.

Runs stopped at step 4 on 2 ranks continue on 4, then on 1; every loss from step 5 on must match
an uninterrupted 2-rank run in fp32. DDP and DeepSpeed ZeRO-0 hold whole copies and load as saved,
FSDP2 reshards through torch's distributed checkpoint; DeepSpeed ZeRO 1-3, converted through its
universal checkpoint, has its own file (test_resize_deepspeed.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import flip_bytes
from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

# A constant LR: a run cut at step 4 then lengthened sees the same LR at every step as the straight one.
RESIZABLE = {
    "scheduler": {"name": "constant"},
    "train": {"micro_batch_size": 2, "global_batch_size": 16, "max_steps": 8},
    "checkpoint": {"every_steps": 2, "keep": 3},
    "launch": {"nproc_per_node": 2},
}
TOLERANCE = 1e-5  # relative, per logged loss


def _recipe(tmp: Path, name: str, backend: str, stage: int, steps: int) -> Path:
    return write_recipe(
        tmp,
        name,
        FAST,
        RESIZABLE,
        {"backend": backend, "zero": {"stage": stage}, "train": {"max_steps": steps}},
    )


def _straight_and_cut(tmp: Path, backend: str, stage: int, end: int) -> Path:
    """An uninterrupted 2-rank run to `end` (runs/straight), and the run directory of one stopped at step 4."""
    for name, steps in (("straight", end), ("moved", 4)):
        result = mplaunch(str(_recipe(tmp, name, backend, stage, steps)))
        assert result.returncode == 0, explain(result)
    return tmp / "runs" / "moved"


def _assert_close(run: dict[int, float], straight: dict[int, float], steps: range) -> None:
    worst = max(abs(run[s] - straight[s]) / abs(straight[s]) for s in steps)
    assert worst <= TOLERANCE, (worst, {s: (run[s], straight[s]) for s in steps})


@pytest.mark.parametrize(
    ("backend", "stage"), [("accelerate", 0), ("deepspeed", 0), ("accelerate", 3)], ids=str
)
def test_a_run_moves_from_two_ranks_to_four_then_one_with_the_losses_of_a_straight_run(
    tmp_path: Path, backend: str, stage: int
) -> None:
    run_dir = _straight_and_cut(tmp_path, backend, stage, 12)

    four = mplaunch("--resume", str(run_dir), "train.max_steps=8", "launch.nproc_per_node=4")
    assert four.returncode == 0, explain(four)
    assert "mplaunch: resuming on 4 ranks, the checkpoint has 2: the global batch stays 16" in four.stdout
    assert "global_batch_size 16 = micro_batch_size 2 x grad_accum 2 x world_size 4" in four.stdout
    assert "resumed step 4 written by 2 ranks on 4 ranks" in four.stderr, explain(four)
    one = mplaunch("--resume", str(run_dir), "train.max_steps=12", "launch.nproc_per_node=1")
    assert one.returncode == 0, explain(one)
    assert "global_batch_size 16 = micro_batch_size 2 x grad_accum 8 x world_size 1" in one.stdout
    assert "resumed step 8 written by 4 ranks on 1 rank" in one.stderr, explain(one)

    _assert_close(losses(run_dir), losses(tmp_path / "runs" / "straight"), range(5, 13))
    resized = [
        (e["from_world"], e["to_world"], e["step"])
        for e in records(run_dir, "event")
        if e["event"] == "resized"
    ]
    assert resized == [(2, 4, 4), (4, 1, 8)]


@pytest.mark.parametrize(("backend", "stage"), [("accelerate", 0), ("deepspeed", 2)], ids=str)
def test_a_corrupt_newest_checkpoint_falls_back_at_a_new_world_size(
    tmp_path: Path, backend: str, stage: int
) -> None:
    run_dir = _straight_and_cut(tmp_path, backend, stage, 8)
    newest = run_dir / "checkpoints" / "step-00000004"
    flip_bytes(max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))

    one = mplaunch("--resume", str(run_dir), "train.max_steps=8", "launch.nproc_per_node=1")
    assert one.returncode == 0, explain(one)
    assert "checkpoint step-00000004 failed verification" in one.stderr
    assert "resumed step 2 written by 2 ranks on 1 rank" in one.stderr, explain(one)
    assert (run_dir / "checkpoints" / "corrupt-step-00000004").is_dir()
    if (
        backend == "deepspeed"
    ):  # the older checkpoint was converted (and pruned since), the corrupt one never was
        assert (
            "resumed step 2 written by 2 ranks on 1 rank: converted to DeepSpeed's universal checkpoint"
            in one.stderr
        )
        assert not (run_dir / "checkpoints" / "corrupt-step-00000004" / "universal").exists()
    _assert_close(losses(run_dir), losses(tmp_path / "runs" / "straight"), range(3, 9))
