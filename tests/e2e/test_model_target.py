"""The `model.target` contract in a real run: the factory next to its recipe gets the run's vocabulary.

One tiny run goes through the CLI with the model's module next to its recipe in a tmp folder,
launched from the project root. The recipe checks are in tests/unit/test_model_target.py, the
worker's side in tests/worker/test_model_target.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.runs import explain, mplaunch, records
from tests.user_code import model_recipe

# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_a_factory_next_to_its_recipe_gets_the_runs_vocabulary(tmp_path: Path) -> None:
    """Launched from the project root, the recipe and its model and data in a folder of their own."""
    folder = tmp_path / "project"
    folder.mkdir()
    words = [f"word{i}" for i in range(60)]
    rng = random.Random(0)
    (folder / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)) + "\n"
    )
    record = tmp_path / "seen.json"
    recipe = model_recipe(
        folder,
        "mine",
        {"kwargs": {"record": str(record)}},
        {
            "data": {"kind": "text", "paths": ["corpus.txt"]},
            "backend": "accelerate",
            "zero": {"stage": 0},
            "launch": {"nproc_per_node": 1},
            "train": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 8},
        },
    )
    result = mplaunch(str(recipe), timeout=300, env={"MPLAUNCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, explain(result)
    plan = json.loads((folder / "runs" / "mine" / "plan.json").read_text())["plan"]
    seen = json.loads(record.read_text())
    assert seen["vocab_size"] == plan["vocab_size"] < 8192  # the trained tokenizer's exact size
    assert "tokenizer" in plan["vocab_source"]
    assert plan["import_dir"] == str(folder.resolve())
    assert Path(seen["cwd"]) != folder  # not imported from the working directory
    assert any(r["step"] == 2 for r in records(folder / "runs" / "mine", "train"))
