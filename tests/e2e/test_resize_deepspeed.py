"""A DeepSpeed run stopped at step 8 on 2 ranks and resumed on 1 and on 4, as a user does it:
`mplaunch RECIPE launch.nproc_per_node=N`. Its losses must continue the uninterrupted 2-rank curve.

Each run trains 8 steps on 2 ranks, is resumed on one size to step 12 and on another to step 16
(2 -> 1 -> 4 and 2 -> 4 -> 1): the first resume converts a checkpoint written by 2 ranks, the second
one written by the new size. The global batch stays 16 (micro-batch 2; grad_accum 8, 4 or 2), so
every step sees the same samples; the schedule is constant after its warm-up, so that stopping at
step 8 (train.max_steps=8, then raised) is the same run as one planned for 16 steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5  # relative, per step: the reduction order over ranks changes the last bits only
STEPS = 16
RESIZABLE = {
    "train": {"micro_batch_size": 2, "global_batch_size": 16, "max_steps": STEPS},
    "scheduler": {"name": "constant"},
    "checkpoint": {"every_steps": 4, "keep": 3},
    "backend": "deepspeed",
}


@pytest.fixture(autouse=True)
def _deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which sets these on import.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def _recipe(tmp: Path, name: str, stage: int) -> Path:
    return write_recipe(tmp, name, FAST, RESIZABLE, {"zero": {"stage": stage}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[int, float]]:
    """The losses of an uninterrupted 2-rank run of each ZeRO stage, run once per module."""
    done: dict[int, dict[int, float]] = {}

    def losses_of(stage: int) -> dict[int, float]:
        if stage not in done:
            tmp = tmp_path_factory.mktemp(f"reference-zero{stage}")
            result = mplaunch(str(_recipe(tmp, "straight", stage)))
            assert result.returncode == 0, explain(result)
            done[stage] = losses(tmp / "runs" / "straight")
            assert sorted(done[stage]) == list(range(1, STEPS + 1))
        return done[stage]

    return losses_of


def _worst(run: dict[int, float], straight: dict[int, float]) -> float:
    """The largest relative loss difference from step 9 on."""
    assert sorted(run) == list(range(1, STEPS + 1))
    return max(abs(run[s] - straight[s]) / abs(straight[s]) for s in range(9, STEPS + 1))


@pytest.mark.parametrize("sizes", [(1, 4), (4, 1)], ids=["2-1-4", "2-4-1"])
@pytest.mark.parametrize("stage", [1, 2, 3], ids=lambda s: f"zero{s}")
def test_a_run_resumed_on_other_world_sizes_continues_the_uninterrupted_curve(
    tmp_path: Path, reference: Callable[[int], dict[int, float]], stage: int, sizes: tuple[int, int]
) -> None:
    recipe = _recipe(tmp_path, "resized", stage)
    run_dir = tmp_path / "runs" / "resized"
    first = mplaunch(str(recipe), "train.max_steps=8")
    assert first.returncode == 0, explain(first)

    for world, end, written_by in ((sizes[0], 12, 2), (sizes[1], 16, sizes[0])):
        result = mplaunch(str(recipe), f"launch.nproc_per_node={world}", f"train.max_steps={end}")
        assert result.returncode == 0, explain(result)
        step = end - 4
        assert f"x world_size {world} (1 node x {world} proc" in result.stdout
        assert f"resumed step {step} written by {written_by} " in result.stderr
        ranks = "1 rank" if world == 1 else f"{world} ranks"
        assert f"on {ranks}: converted to DeepSpeed's universal checkpoint in " in result.stderr, explain(result)
        assert f" s (kept in step-{step:08d}/universal) (" in result.stderr
        assert (run_dir / "checkpoints" / f"step-{step:08d}" / "universal" / "manifest.json").is_file()

    resized = [r for r in records(run_dir, "event") if r["event"] == "resized"]
    assert [(r["step"], r["from_world"], r["to_world"]) for r in resized] == [(8, 2, sizes[0]), (12, *sizes)]
    straight = reference(stage)
    run = losses(run_dir)
    assert all(run[s] == straight[s] for s in range(1, 9))  # the same first 8 steps, on 2 ranks
    worst = _worst(run, straight)
    print(f"ZeRO-{stage} 2 -> {sizes[0]} -> {sizes[1]}: largest relative loss difference {worst:.2e}")
    assert worst <= TOLERANCE, {s: (run[s], straight[s]) for s in range(9, STEPS + 1)}


def test_a_stage0_run_resumes_on_another_world_size_as_saved(
    tmp_path: Path, reference: Callable[[int], dict[int, float]]
) -> None:
    # Stage 0 keeps everything whole on every rank: nothing to convert.
    recipe = _recipe(tmp_path, "resized", 0)
    run_dir = tmp_path / "runs" / "resized"
    first = mplaunch(str(recipe), "train.max_steps=8")
    assert first.returncode == 0, explain(first)
    result = mplaunch(str(recipe), "launch.nproc_per_node=1")
    assert result.returncode == 0, explain(result)

    assert "resumed step 8 written by 2 " in result.stderr
    assert "universal" not in result.stderr
    assert not (run_dir / "checkpoints" / "step-00000008" / "universal").exists()
    (resized,) = [r for r in records(run_dir, "event") if r["event"] == "resized"]
    assert (resized["from_world"], resized["to_world"]) == (2, 1)
    worst = _worst(losses(run_dir), reference(0))
    print(f"ZeRO-0 2 -> 1: largest relative loss difference {worst:.2e}")
    assert worst <= TOLERANCE
