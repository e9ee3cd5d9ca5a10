"""The `data.target` contract: a user's dataset factory next to the recipe, what it is given, which
keys beside it are refused at check, what the task fills in, and how a bad item is reported.

The recipe and its module (tests/user_code.py) live in a tmp folder; three short runs go through
the CLI from the project root, as a user's would. The check-time rules are in
tests/unit/test_data_target.py, the worker's loader in tests/worker/test_data_target.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runs import explain, mplaunch, records
from tests.user_code import VOCAB, data_recipe

# --------------------------------------------------------------------------- the batches


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_a_user_model_receives_causal_batches_of_the_dataset_on_two_ranks(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    recipe = data_recipe(
        tmp_path / "project",
        "mine",
        {"model": {"kwargs": {"record": str(seen)}}, "backend": "deepspeed", "train": {"max_steps": 2}},
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 0, explain(result)
    batches = [json.loads(Path(f"{seen}.{rank}.json").read_text()) for rank in (0, 1)]
    for batch in batches:
        assert batch["labels"] == batch["input_ids"]
        assert all(len(row) == 32 and max(row) < VOCAB for row in batch["input_ids"])
    assert batches[0]["input_ids"] != batches[1]["input_ids"]  # each rank its slice of the global batch
    assert any(r["step"] == 2 for r in records(tmp_path / "project" / "runs" / "mine", "train"))


@pytest.mark.slow
def test_a_built_in_model_trains_on_a_user_dataset_under_accelerate(tmp_path: Path) -> None:
    recipe = data_recipe(
        tmp_path,
        "gpt2",
        {"backend": "accelerate", "zero": {"stage": 0}, "train": {"max_steps": 2}},
        model={"name": "gpt2-lm", "vocab_size": VOCAB, "dropout": 0.0},
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 0, explain(result)
    assert sorted(r["step"] for r in records(tmp_path / "runs" / "gpt2", "train")) == [1, 2]


@pytest.mark.slow
def test_a_bad_item_stops_the_run_with_one_line_naming_it(tmp_path: Path) -> None:
    recipe = data_recipe(
        tmp_path,
        "flawed",
        {
            "data": {"kwargs": {"flaw": "length"}},
            "backend": "accelerate",
            "zero": {"stage": 0},
            "launch": {"nproc_per_node": 1},
            "train": {"global_batch_size": 8, "max_steps": 2},
        },
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode != 0, explain(result)
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if "the run failed on rank-0" in line]
    assert len(failed) == 1, explain(result)
    assert "data.target: arith_data:arithmetic's item" in failed[0]
    assert "input_ids has 31 values, expected data.seq_len 32" in failed[0]
