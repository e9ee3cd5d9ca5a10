"""scheduler.warmup_style hf gives Hugging Face's schedules exactly: mplaunch's LambdaLR factor against
transformers' get_*_schedule_with_warmup, step by step, for every schedule mplaunch offers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from launcher.plan import schedule
from launcher.recipe.schema import Recipe, validate

STEPS = 50


def _recipe(name: str, warmup: int, floor: float = 0.0, style: str = "hf") -> Recipe:
    raw = {
        "name": "t",
        "data": {"kind": "synthetic"},
        "train": {"max_steps": STEPS},
        "scheduler": {"name": name, "warmup_steps": warmup, "min_lr_ratio": floor, "warmup_style": style},
    }
    return validate(raw, "test")


def _hf_lrs(make: Callable[..., Any], **kwargs: Any) -> list[float]:
    """The lr of each of STEPS optimizer steps under transformers' schedule (peak 1.0)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer, **kwargs)
    out = []
    for _ in range(STEPS):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup", [0, 1, 7])
@pytest.mark.parametrize(
    ("name", "floor", "make", "kwargs"),
    [
        ("linear", 0.0, transformers.get_linear_schedule_with_warmup, {"num_training_steps": STEPS}),
        ("cosine", 0.0, transformers.get_cosine_schedule_with_warmup, {"num_training_steps": STEPS}),
        (
            "cosine",
            0.1,
            transformers.get_cosine_with_min_lr_schedule_with_warmup,
            {"num_training_steps": STEPS, "min_lr_rate": 0.1},
        ),
        ("constant", 0.0, transformers.get_constant_schedule_with_warmup, {}),
    ],
)
def test_hf_style_equals_transformers(
    warmup: int, name: str, floor: float, make: Callable[..., Any], kwargs: dict[str, Any]
) -> None:
    at = schedule.factor(_recipe(name, warmup, floor))
    ours = [at(n) for n in range(STEPS)]
    theirs = _hf_lrs(make, num_warmup_steps=warmup, **kwargs)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_mplaunch_style_differs_only_in_warmup() -> None:
    hf, ours = schedule.factor(_recipe("linear", 5)), schedule.factor(_recipe("linear", 5, style="mplaunch"))
    assert [hf(n) for n in range(5)] == [n / 5 for n in range(5)]
    assert [ours(n) for n in range(5)] == [(n + 1) / 6 for n in range(5)]
    assert [hf(n) for n in range(5, STEPS)] == [ours(n) for n in range(5, STEPS)]
