"""The learning-rate schedule: the peak LR times a factor of the optimizer steps applied so far.

Light side (no torch): the backends build their LambdaLR from `factor`, and the
launcher evaluates the same function to say what a resume with a changed
schedule does. Skipped fp16 steps are not applied steps, so they do not advance it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe


def factor(recipe: Recipe) -> Callable[[int], float]:
    """The multiplier of optimizer.lr after `n` applied optimizer steps: linear warmup, then decay
    (scheduler.name) to scheduler.min_lr_ratio at train.max_steps.

    Warmup is (n+1)/(W+1) (scheduler.warmup_style mplaunch) or n/W (hf). The decay is Hugging
    Face's: with min_lr_ratio 0, linear and cosine equal transformers'
    get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup over the run's steps, and
    cosine with a floor its get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_lr_ratio).
    """
    s, total = recipe.scheduler, recipe.train.max_steps
    warmup, floor = s.warmup_steps, s.min_lr_ratio
    # hf's first step has lr 0 (a step that only moves Adam's moments); mplaunch's starts at
    # lr/(W+1) and both reach lr at step W.
    offset = 1 if s.warmup_style == "mplaunch" else 0

    def at(n: int) -> float:
        if n < warmup:
            return (n + offset) / (warmup + offset)
        if s.name == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (n - warmup) / (total - warmup))
        shape = 1.0 - progress if s.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return at


def lr_at(recipe: Recipe, applied_steps: int) -> float:
    """The learning rate of the next optimizer step after `applied_steps` applied ones."""
    return recipe.optimizer.lr * factor(recipe)(applied_steps)


def continue_on(scheduler: Any, recipe: Recipe) -> None:
    """After a checkpoint is loaded: this recipe's optimizer settings and schedule apply from here.

    Loading restores the saving run's lr, betas, eps and weight decay into the optimizer's
    parameter groups and its peak LR into the LambdaLR, which would silently undo a changed
    recipe. The applied-step count (`scheduler.last_epoch`) is the checkpoint's; the next LR
    is the new schedule at that count. An unchanged recipe gives the very same values.

    Args:
        scheduler: the torch LambdaLR over the optimizer whose parameter groups are mplaunch's
            [decayed, not decayed] (launcher.worker.backends.param_groups).
    """
    o, optimizer = recipe.optimizer, scheduler.optimizer
    at = factor(recipe)
    applied = scheduler.last_epoch
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = tuple(o.betas)
        group["eps"] = o.eps
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * at(applied)
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    scheduler.lr_lambdas = [at for _ in optimizer.param_groups]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
