"""The logged lr is the one each step used; evaluation is token-weighted over the whole held-out
split, with the task's metric (perplexity, accuracy and F1). One process, fake backends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from launcher.plan import schedule
from launcher.plan.resolve import Plan
from launcher.rundir.layout import RunDir
from launcher.worker import data, evaluation, ranks, train
from launcher.worker.backends import StepStats
from launcher.worker.metrics import describe_eval
from launcher.worker.model_setup import ClassifierLoss
from tests.fake_loop import FakeBackend, loop_run, small_plan

ONE = ranks.Dist(rank=0, world=1, local_rank=0, control=None)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(small_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _records(plan: Plan, kind: str) -> list[dict[str, Any]]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class ScheduledBackend(FakeBackend):
    """A fake backend whose lr follows the run's schedule through a torch LambdaLR, as the real ones do;
    eval losses differ from batch to batch."""

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=plan.recipe.optimizer.lr)
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor(plan.recipe))
        self.eval_losses: list[float] = []

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats:
        stats = super().train_step(micro_batches)
        if not stats.skipped:  # a skipped step does not advance the schedule
            self.optimizer.step()
            self.scheduler.step()
        return stats

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        super().eval_loss(batch)
        self.eval_losses.append(1.0 + len(self.eval_losses))
        return torch.tensor(self.eval_losses[-1])


@pytest.mark.parametrize("style", ["mplaunch", "hf"])
def test_the_logged_lr_is_the_one_each_step_used(tmp_path: Path, tokens: data.Tokens, style: str) -> None:
    plan = small_plan(tmp_path, "scheduler.warmup_steps=3", f"scheduler.warmup_style={style}")
    backend = ScheduledBackend(plan, skipped=(2,))
    r = loop_run(plan, tokens, backend)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    logged = [(t["step"], t["lr"]) for t in _records(plan, "train")]
    # Step k (1-based) applies after k-1 steps, less the skipped step 2, which did not advance it.
    applied = [0, 1, 1, 2, 3, 4]
    assert logged == [
        (k, pytest.approx(schedule.lr_at(plan.recipe, a))) for k, a in zip(range(1, 7), applied, strict=True)
    ]
    assert logged[0][1] == (0.0 if style == "hf" else plan.recipe.optimizer.lr / 4)


def test_eval_is_token_weighted_over_the_whole_held_out_split(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "train.eval_steps=0")
    r = loop_run(plan, tokens, ScheduledBackend(plan))
    assert r.evals is not None
    backend = r.backend
    assert isinstance(backend, ScheduledBackend)
    rows = r.evals.rows
    batches = [r.evals.collate(rows[i : i + 4], epoch=0) for i in range(0, len(rows), 4)]
    counts = [int(b["labels"].ne(-100).sum()) for b in batches]  # masked LM: no shift
    got = evaluation.evaluate(backend, r.evals, plan, ONE)
    assert len(backend.eval_losses) == len(batches) == math.ceil(len(rows) / 4)  # every held-out row
    expected = sum(loss * n for loss, n in zip(backend.eval_losses, counts, strict=True)) / sum(counts)
    assert got["eval_loss"] == pytest.approx(expected)
    assert got["eval_labels"] == sum(counts)
    assert got["eval_perplexity"] == pytest.approx(math.exp(expected))
    assert "eval_accuracy" not in got


def test_eval_steps_limits_the_micro_batches(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "train.eval_steps=2")
    r = loop_run(plan, tokens, ScheduledBackend(plan))
    assert r.evals is not None
    evaluation.evaluate(r.backend, r.evals, plan, ONE)
    assert len(r.backend.eval_losses) == 2  # type: ignore[attr-defined]


def test_the_eval_record_goes_to_metrics_and_the_console(
    tmp_path: Path, tokens: data.Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = small_plan(tmp_path)
    r = loop_run(plan, tokens, FakeBackend())
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    evals = _records(plan, "eval")
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert {"eval_loss", "eval_labels", "eval_perplexity"} <= set(evals[0])
    assert evals[0]["eval_loss"] == pytest.approx(1.5)
    assert "step 2: eval loss 1.5000, perplexity 4.482 (over " in capsys.readouterr().out


@pytest.mark.parametrize(("rows", "world"), [(10, 2), (9, 2), (7, 3), (1, 2), (16, 4)])
def test_every_rank_evaluates_the_same_number_of_micro_batches(rows: int, world: int) -> None:
    evals = SimpleNamespace(rows=np.arange(rows), micro=2)
    shares = [evaluation.chunks(evals, 0, rank, world) for rank in range(world)]  # type: ignore[arg-type]
    assert len({len(s) for s in shares}) == 1  # a rank with fewer rows (or none) repeats a micro-batch
    real = [
        row
        for rank, s in enumerate(shares)
        for i, c in enumerate(s)
        if i * 2 < len(evals.rows[rank::world])  # as evaluate counts them
        for row in c
    ]
    assert sorted(real) == list(range(rows))


class _Classifier(nn.Module):
    """Logits chosen per row by its first input id: class 1 when it is odd."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        odd = (input_ids[:, 0] % 2).float()
        return SimpleNamespace(logits=torch.stack([1 - odd, odd], dim=1) * 5)


class _ClassifierBackend:
    def __init__(self) -> None:
        self.model = ClassifierLoss(_Classifier())

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).detach()


class _Rows:
    """Held-out rows of a classifier: row i has first input id i and label i % 3 == 0."""

    def __init__(self, n: int, micro: int) -> None:
        self.rows, self.micro = np.arange(n), micro

    def collate(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(rows).reshape(-1, 1)
        return {"input_ids": ids, "labels": torch.tensor([int(i % 3 == 0) for i in rows])}


def test_a_classifier_s_eval_gives_accuracy_and_f1() -> None:
    plan = SimpleNamespace(
        model=SimpleNamespace(
            task="sequence-classification", num_labels=2, causal=False, language_model=False
        ),
        recipe=SimpleNamespace(train=SimpleNamespace(eval_steps=0)),
    )
    got = evaluation.evaluate(_ClassifierBackend(), _Rows(10, 4), plan, ONE)  # type: ignore[arg-type]
    truth = [int(i % 3 == 0) for i in range(10)]
    predicted = [i % 2 for i in range(10)]
    tp = sum(t == p == 1 for t, p in zip(truth, predicted, strict=True))
    fp = sum(p == 1 and t == 0 for t, p in zip(truth, predicted, strict=True))
    fn = sum(p == 0 and t == 1 for t, p in zip(truth, predicted, strict=True))
    assert got["eval_accuracy"] == pytest.approx(
        sum(t == p for t, p in zip(truth, predicted, strict=True)) / 10
    )
    assert got["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["eval_labels"] == 10
    assert "eval_perplexity" not in got
    assert describe_eval(got).startswith("eval loss ")
    assert ", accuracy 0.5000, F1 " in describe_eval(got)
