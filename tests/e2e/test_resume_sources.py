"""Bitwise resume on every kind of data source: a run resumed from a mid-run checkpoint ends exactly
where the uninterrupted run ended (final checkpoint and every step's loss).

Each source trains STEPS steps on 2 CPU ranks once, saving every 2 steps; the final checkpoint is
moved aside and the run is started again, so it resumes from the step-2 checkpoint written while
the first run went on (its FINISHED marker removed), and must write the same final checkpoint and
the same losses. (tests/
test_resume.py stops runs with a signal; the data order, which is what differs between sources,
is restored the same way either way: from the step count alone.) The backends alternate.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir.layout import FINISHED_FILE
from tests.checkpoint_state import assert_bitwise_equal, final_checkpoint
from tests.runs import FAST, FAST_USER_MODEL, ROOT, explain, losses, mplaunch, write_recipe
from tests.user_code import data_recipe

pytestmark = pytest.mark.slow

STEPS = 4
DATA = ROOT / "recipes" / "data"
RESUMABLE = {
    "train": {"max_steps": STEPS},
    "checkpoint": {"every_steps": 2, "keep": 3},
    "scheduler": {"name": "constant", "warmup_steps": 0},
}


def _backend(name: str) -> dict[str, Any]:
    return {"backend": name, "zero": {"stage": 2 if name == "deepspeed" else 0}}


def _data_target(tmp: Path, models: Path) -> Path:
    return data_recipe(tmp, "target", RESUMABLE, _backend("deepspeed"))


def _jsonl_classification(tmp: Path, models: Path) -> Path:
    layer = {
        "model": {"name": None, "hf": str(models / "tiny-bert"), "num_labels": 4},
        "data": {"task": "sequence-classification", "kind": "jsonl", "paths": [str(DATA / "topics.jsonl")]},
    }
    return write_recipe(tmp, "jsonl", FAST_USER_MODEL, RESUMABLE, layer, _backend("accelerate"))


def _csv_masked_lm(tmp: Path, models: Path) -> Path:
    rows = [json.loads(line) for line in (DATA / "topics.jsonl").read_text().splitlines()[:400]]
    with (tmp / "topics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    layer = {"model": {"dropout": 0.1}, "data": {"kind": "csv", "paths": ["topics.csv"]}}
    return write_recipe(tmp, "csv", FAST, RESUMABLE, layer, _backend("deepspeed"))


def _unpacked_token_cache(tmp: Path, models: Path) -> Path:
    layer = {
        "model": {"name": "gpt2-lm", "dropout": 0.1},
        "data": {"kind": "text", "paths": [str(DATA / "corpus.txt")], "pack": False},
    }
    return write_recipe(tmp, "unpacked", FAST, RESUMABLE, layer, _backend("accelerate"))


SOURCES: dict[str, Callable[[Path, Path], Path]] = {
    "data.target": _data_target,
    "jsonl sequence-classification": _jsonl_classification,
    "csv masked-lm": _csv_masked_lm,
    "token cache, pack false": _unpacked_token_cache,
}


@pytest.fixture(autouse=True)
def _deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which sets these on import.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_resumed_run_equals_the_uninterrupted_one_bitwise(
    tmp_path: Path, tiny_models: Path, source: str
) -> None:
    recipe = SOURCES[source](tmp_path, tiny_models)
    env = {"MPLAUNCH_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "runs" / recipe.stem
    first = mplaunch(str(recipe), timeout=600, env=env)
    assert first.returncode == 0, explain(first)
    straight, straight_losses = tmp_path / "uninterrupted", losses(run_dir)
    assert sorted(straight_losses) == list(range(1, STEPS + 1))
    shutil.move(final_checkpoint(run_dir, STEPS), straight)
    (run_dir / FINISHED_FILE).unlink()  # as if the run had stopped after its step-2 checkpoint

    again = mplaunch(str(recipe), timeout=600, env=env)
    assert again.returncode == 0, explain(again)
    assert "resuming from step 2" in again.stdout, explain(again)
    assert_bitwise_equal(straight, final_checkpoint(run_dir, STEPS))
    assert losses(run_dir) == straight_losses  # steps 3 and 4 again, each the same
