"""scheduler.warmup_style: mplaunch's (n+1)/(W+1) warmup (the default) or Hugging Face's n/W.

The comparison with transformers' own schedule functions is tests/worker/test_schedule_hf.py.
"""

from __future__ import annotations

import math

import pytest

from launcher.plan import schedule
from launcher.recipe.schema import Recipe, validate


def _recipe(**scheduler: object) -> Recipe:
    raw = {
        "name": "t",
        "data": {"kind": "synthetic"},
        "train": {"max_steps": 10},
        "optimizer": {"lr": 1e-3},
        "scheduler": scheduler,
    }
    return validate(raw, "test")


def test_the_default_is_mplaunch_warmup() -> None:
    assert _recipe().scheduler.warmup_style == "mplaunch"
    at = schedule.factor(_recipe(warmup_steps=4))
    assert [at(n) for n in range(4)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]  # the first step moves the weights
    assert at(4) == 1.0


def test_hf_warmup_starts_at_zero() -> None:
    at = schedule.factor(_recipe(warmup_steps=4, warmup_style="hf", name="constant"))
    assert [at(n) for n in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule.lr_at(_recipe(warmup_steps=4, warmup_style="hf"), 0) == 0.0


@pytest.mark.parametrize("style", ["mplaunch", "hf"])
def test_the_decay_is_the_same_in_both_styles(style: str) -> None:
    at = schedule.factor(_recipe(warmup_steps=2, warmup_style=style, name="cosine", min_lr_ratio=0.1))
    # After warmup, step 6 of 10 is half way through the decay: the floor plus half the rest.
    assert at(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert at(2) == 1.0


def test_an_unknown_style_is_refused() -> None:
    with pytest.raises(Exception, match="warmup_style"):
        _recipe(warmup_style="linear")
