"""Evaluation: the held-out split's token-weighted loss and the task's metric, across ranks.

The loss is the sum of the label losses over the number of labels, over every rank's share of
the held-out rows (train.eval_steps micro-batches per rank when it is set), as Hugging Face's
Trainer takes it: a label token of a language model, a row of a classifier. Each rank keeps its
sums on the device and the ranks add them in one all_reduce per evaluation, not one per batch.
The task's metric: perplexity (exp of the loss) for a language model; accuracy, and F1 of class 1
for two classes, for a sequence classifier.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from launcher.plan.resolve import Plan
from launcher.recipe import tasks
from launcher.worker import data
from launcher.worker.backends import Backend
from launcher.worker.model_setup import ClassifierLoss
from launcher.worker.models import label_tokens
from launcher.worker.ranks import Dist

# The sums each rank keeps, in this order, added across ranks in one all_reduce.
_LOSS, _LABELS, _CORRECT, _TP, _FP, _FN = range(6)


def chunks(evals: data.Batches, num_batches: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's evaluation micro-batches: its share of the held-out rows (every world-th row),
    `num_batches` of them at most (0: all). Every rank gets the same number of micro-batches, so a
    backend that gathers parameters in each forward (ZeRO-3) never waits on a rank that has none left:
    a rank short of one repeats the split's first micro-batch, which `evaluate` leaves out of the sums."""
    rows = evals.rows[rank::world]
    most = -(-len(evals.rows) // world)  # rank 0's share, the largest
    count = -(-most // evals.micro)
    if num_batches:
        count = min(count, num_batches)
    mine = [rows[i : i + evals.micro] for i in range(0, len(rows), evals.micro)][:count]
    return mine + [evals.rows[: evals.micro]] * (count - len(mine))


def evaluate(backend: Backend, evals: data.Batches, plan: Plan, d: Dist) -> dict[str, Any]:
    """The eval record's numbers (README "Run directory"): eval_loss, eval_labels, and
    eval_perplexity (language models) or eval_accuracy and, for two classes, eval_f1 (classifiers).

    A collective: every rank calls it at the same step.
    """
    classify = plan.model.task == tasks.SEQUENCE_CLASSIFICATION
    mine = chunks(evals, plan.recipe.train.eval_steps, d.rank, d.world)
    real = len(evals.rows[d.rank :: d.world])
    sums: torch.Tensor | None = None
    with _logits_of(backend.model if classify else None) as logits:
        for i, rows in enumerate(mine):
            batch = evals.collate(rows, epoch=0)
            loss = backend.eval_loss(batch)
            if i * evals.micro >= real:  # a repeated micro-batch (`chunks`): the forward only
                continue
            part = _sums(loss, batch["labels"], plan.model.causal, logits.pop() if logits else None)
            sums = part if sums is None else sums + part
    if sums is None:
        sums = torch.zeros(6, device=_device(backend))
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    return _record(sums.tolist(), classify, plan)


def _sums(
    loss: torch.Tensor, labels: torch.Tensor, causal: bool, logits: torch.Tensor | None
) -> torch.Tensor:
    """One micro-batch's sums, on the loss's device; `labels` is the host batch's (counting them
    reads no device memory). The model's loss is the mean over its labels: the labels other than
    -100 (after the causal shift), or the rows of a classifier or a model that takes other labels."""
    tokens = logits is None and labels.dim() > 1
    count = label_tokens(labels, causal) if tokens else labels.shape[0]
    out = torch.zeros(6, device=loss.device)
    if count:  # a micro-batch without labels has a NaN mean loss and adds nothing
        out[_LOSS] = loss.float() * count
        out[_LABELS] = count
    if logits is not None:
        predicted = logits.argmax(-1)
        truth = labels.to(predicted.device)
        positive, chosen = truth == 1, predicted == 1
        out[_CORRECT] = (predicted == truth).sum()
        out[_TP] = (positive & chosen).sum()
        out[_FP] = (~positive & chosen).sum()
        out[_FN] = (positive & ~chosen).sum()
    return out


def _record(sums: list[float], classify: bool, plan: Plan) -> dict[str, Any]:
    labels = sums[_LABELS]
    loss = sums[_LOSS] / labels if labels else math.nan
    out: dict[str, Any] = {"eval_loss": loss, "eval_labels": int(labels)}
    if classify:
        out["eval_accuracy"] = sums[_CORRECT] / labels if labels else math.nan
        if plan.model.num_labels == 2:
            tp, fp, fn = sums[_TP], sums[_FP], sums[_FN]
            out["eval_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    elif plan.model.language_model:
        out["eval_perplexity"] = math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan
    return out


@contextmanager
def _logits_of(model: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """The logits of each forward of the classifier inside `model` (ClassifierLoss returns only its
    loss), captured from its transformers model's output while the context is open."""
    captured: list[torch.Tensor] = []
    found = next((m for m in model.modules() if isinstance(m, ClassifierLoss)), None) if model else None
    if found is None:
        yield captured
        return

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output.logits.detach())

    handle = found.lm.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def _device(backend: Backend) -> torch.device:
    return next(backend.model.parameters()).device
