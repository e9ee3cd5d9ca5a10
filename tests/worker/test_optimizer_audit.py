"""The optimizer audit (launcher.worker.audit) and the fix it was written to catch: DeepSpeed's stage-0
16-bit optimizers step Adam once on zero gradients when they are built.

Real engines on CPU in one process (gloo, world 1): the step counter after the build and after one
step, and Adam's first update as a multiple of lr, per backend, stage and dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.analysis.compare import compare
from launcher.analysis.health import FIRST_UPDATE_EVENT, STEPS_EVENT
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate
from launcher.rundir.metrics_log import read_metrics
from launcher.worker import audit
from launcher.worker.backends import load_backend
from launcher.worker.metrics import Meter
from launcher.worker.model_setup import model_for
from tests.one_rank import one_rank_world

CPU = Hardware(gpus=(), cpu_count=2)
BETAS = (0.9, 0.95)
AHEAD = (1 + BETAS[1]) ** 0.5 / (1 + BETAS[0])  # Adam's first update one step ahead: 0.7349 x lr


@pytest.fixture(scope="module", autouse=True)
def _one_process_group() -> Iterator[None]:
    """A one-process gloo group for the module, as torchrun would set it up for a world of 1 (DeepSpeed
    keeps the first group it sees for the process's life).

    Importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK for good, and torch's first optimizer step
    TORCHINDUCTOR_CACHE_DIR: both happen here, before the per-test env-leak check watches.
    """
    with one_rank_world():
        yield


def make_plan(tmp_path: Path, backend: str, dtype: str, stage: int = 0) -> Plan:
    raw = {
        "name": "audit",
        "model": {"name": "tiny-mlp", "dropout": 0.0},
        "data": {"kind": "synthetic", "seq_len": 16, "num_samples": 64},
        "train": {"micro_batch_size": 4, "global_batch_size": 4},
        "optimizer": {"lr": 1e-3, "betas": list(BETAS)},
        "scheduler": {"warmup_steps": 0},
        "precision": {"dtype": dtype},
        "zero": {"stage": stage},
        "launch": {"device": "cpu", "nproc_per_node": 1},
        "logging": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
        "backend": backend,
    }
    return resolve(validate(raw, "test"), CPU)


def batch(plan: Plan) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, plan.shape.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "labels": ids.clone()}]


def counters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


def build(plan: Plan) -> Any:
    torch.manual_seed(0)
    return load_backend(plan, model_for(plan)[0])


CASES = [
    ("deepspeed", "bf16", 0),
    ("deepspeed", "fp32", 0),
    ("deepspeed", "bf16", 1),
    ("deepspeed", "bf16", 2),
    ("deepspeed", "bf16", 3),
    ("deepspeed", "fp32", 2),
    ("accelerate", "fp32", 0),
    ("accelerate", "bf16", 0),
]


@pytest.mark.parametrize(("backend", "dtype", "stage"), CASES, ids=[f"{b}-{d}-zero{s}" for b, d, s in CASES])
def test_adam_starts_at_step_zero_and_moves_lr_at_its_first_step(
    tmp_path: Path, backend: str, dtype: str, stage: int
) -> None:
    plan = make_plan(tmp_path, backend, dtype, stage)
    engine = build(plan)
    optimizer = engine.torch_optimizer()
    assert counters(optimizer) <= {0}, "the optimizer stepped before training"
    assert all(
        float(t.abs().max()) == 0 for s in optimizer.state.values() for k, t in s.items() if k != "step"
    )
    first = audit.FirstUpdate(engine)
    engine.train_step(batch(plan))
    assert counters(optimizer) == {1}
    ratios, lr = first.ratios()
    assert lr == pytest.approx(1e-3)
    assert len(ratios) >= 100
    assert float(ratios.median()) == pytest.approx(1.0, abs=0.01)
    assert first.events(engine.skipped_steps(), plan) == []


def test_stage0_16bit_masters_are_the_weights_they_were_cloned_from(tmp_path: Path) -> None:
    # The pre-step's weight decay shrank DeepSpeed's fp32 masters once; undoing it restores them exactly.
    engine = build(make_plan(tmp_path, "deepspeed", "bf16"))
    opt = engine.engine.optimizer
    for masters, params in zip(opt.fp32_groups, opt.fp16_groups, strict=True):
        for master, p in zip(masters, params, strict=True):
            assert torch.equal(master, p.float())


def test_the_audit_fires_on_a_pre_stepped_optimizer_and_parity_fails(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "accelerate", "fp32")
    engine = build(plan)
    optimizer = engine.torch_optimizer()
    for p in engine.model.parameters():  # what DeepSpeed's stage-0 16-bit optimizers do when built
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    Path(plan.run_dir).mkdir(parents=True)
    meter = Meter(plan, True, 0, None)
    first = audit.FirstUpdate(engine)
    engine.train_step(batch(plan))
    first.record(engine, meter)
    ratios, _ = first.ratios()
    assert float(ratios.median()) == pytest.approx(AHEAD, abs=0.01)
    audit.record_counters(engine, 1, meter)  # as a checkpoint after step 1 does
    meter.close()

    metrics = read_metrics(plan.run_dir)
    (steps,) = metrics.named(STEPS_EVENT)  # step 1's and the checkpoint's: the latest per (event, step)
    assert steps["expected"] == 1
    assert steps["counters"] == {"2": len(optimizer.state)}
    assert "optimizer audit" in steps["message"]
    assert "took steps the run did not" in steps["cause"]
    (update,) = metrics.named(FIRST_UPDATE_EVENT)
    assert update["ratio"] == pytest.approx(AHEAD, abs=0.01)
    assert "by 0.735 x lr" in update["message"]
    assert "moves 0.735 x lr at betas 0.9/0.95" in update["message"]
    assert "backend=accelerate zero.stage=0 precision.dtype=fp32" in update["remedy"]

    # parity fails on the audit even where the losses are the same run's
    logged = dataclasses.replace(metrics, train=({"kind": "train", "step": 1, "loss": 2.0},))
    reference = dataclasses.replace(logged, events=())
    assert compare(reference, reference, "bf16", 1, tolerance=0.02).passed
    result = compare(reference, logged, "bf16", 1, tolerance=0.02)
    assert not result.passed
    assert len(result.problems) == 2  # the step counters and the first update
    assert all(p.startswith("optimizer audit of the bf16 run, step 1: ") for p in result.problems)
    assert any("step counters are not the 1 optimizer steps" in p for p in result.problems)
    result = compare(logged, logged, "bf16", 1, tolerance=0.02)
    assert result.lines()[-1].startswith("FAIL: bf16 vs fp32: optimizer audit of the fp32 run, step 1:")


def test_a_skipped_fp16_step_is_not_counted(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "accelerate", "fp32")
    engine = build(plan)
    first = audit.FirstUpdate(engine)
    engine.train_step(batch(plan))
    # One step taken; had the backend reported it skipped, the optimizer should not have counted it.
    assert first.events(0, plan) == []
    (event,) = first.events(1, plan)
    assert event[0] == STEPS_EVENT
    assert event[2]["expected"] == 0
    assert "on a step reported skipped" in event[2]["cause"]
