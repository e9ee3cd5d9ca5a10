"""Which task a recipe trains: the recipe's own, or the built-in model's."""

from __future__ import annotations

from typing import Any

import pytest

from launcher.errors import UserError
from launcher.recipe import tasks
from launcher.recipe.schema import validate


def _recipe(**sections: Any):
    raw: dict[str, Any] = {"name": "t", "train": {"micro_batch_size": 4}}
    raw.update(sections)
    return validate(raw, "test")


@pytest.mark.parametrize(
    ("model", "task", "expected"),
    [
        ({"name": "bert-mlm"}, "auto", "masked-lm"),
        ({"name": "gpt2-lm"}, "auto", "causal-lm"),
        ({"name": "tiny-mlp"}, "auto", "masked-lm"),
        ({"name": None, "target": "pkg.mod:build"}, "auto", "masked-lm"),
        ({"name": None, "target": "pkg.mod:build"}, "causal-lm", "causal-lm"),
        ({"name": "gpt2-lm"}, "causal-lm", "causal-lm"),
    ],
)
def test_the_task_is_the_recipes_or_the_built_in_models(model: dict, task: str, expected: str) -> None:
    assert tasks.resolve(_recipe(model=model, data={"task": task})) == expected


def test_a_built_in_model_cannot_learn_another_objective() -> None:
    with pytest.raises(UserError) as caught:
        _recipe(model={"name": "bert-mlm"}, data={"task": "causal-lm"})
    assert caught.value.lines == [
        "test: data.task: bert-mlm is a masked-lm model, it cannot train causal-lm; "
        "use model.hf or a model.target"
    ]
    assert tasks.problems(_recipe(model={"name": "gpt2-lm"}, data={"task": "causal-lm"})) == []
    assert tasks.problems(_recipe(model={"name": "tiny-mlp"}, data={"task": "masked-lm"})) == []
