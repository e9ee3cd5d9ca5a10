"""Packing in a real run: two ranks train a tiny GPT-2 on packed documents and resume exactly.

The rows and the models in one process are in tests/worker/test_packing.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.runs import explain, losses, mplaunch

ROOT = Path(__file__).resolve().parents[2]
BERT_TINY = ROOT / "recipes" / "bert_tiny.yaml"  # its data: the shipped corpus, one document per line


def _packed_recipe(tmp_path: Path, name: str, max_steps: int) -> Path:
    """The tiny GPT-2 on the shipped corpus, 2 CPU ranks, a constant LR (the run's length changes nothing)."""
    body = {
        "extends": str(BERT_TINY),
        "name": name,
        "model": {"name": "gpt2-lm", "dropout": 0.1},
        "data": {"task": "causal-lm", "seq_len": 32},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "max_steps": max_steps, "eval_every": 2},
        "scheduler": {"name": "constant"},
        "checkpoint": {"every_steps": 2},
        "logging": {"dir": str(tmp_path / "runs"), "every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.mark.slow
def test_two_ranks_train_a_tiny_gpt2_on_packed_documents_and_resume_exactly(tmp_path: Path) -> None:
    env = {"MPLAUNCH_CACHE": str(tmp_path / "cache")}
    result = mplaunch(str(_packed_recipe(tmp_path, "straight", 4)), env=env)
    assert result.returncode == 0, explain(result)
    assert "packed documents kept apart: GPT2LMHeadModel gets position_ids" in result.stdout
    straight = losses(tmp_path / "runs" / "straight")
    assert sorted(straight) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in straight.values())
    # Two steps, then on to four from the checkpoint: the same batches, position_ids included.
    stopped = _packed_recipe(tmp_path, "resumed", 2)
    assert (first := mplaunch(str(stopped), env=env)).returncode == 0, explain(first)
    resumed = mplaunch(str(stopped), "train.max_steps=4", env=env)
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from step 2" in resumed.stdout
    assert losses(tmp_path / "runs" / "resumed") == straight
