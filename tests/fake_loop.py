"""The training loop in one process with a fake backend: no torch.distributed, no model.

Shared by tests/worker/test_worker_loop.py and tests/worker/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.rundir.layout import RunDir
from launcher.worker import data, ranks, train
from launcher.worker.backends import StepStats
from launcher.worker.checkpointer import Checkpointer
from launcher.worker.metrics import Meter

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.kind=synthetic",
    "data.paths=[]",
    "data.num_samples=96",
    "data.eval_fraction=0.2",
    "data.num_workers=0",
    "launch.nproc_per_node=1",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.max_steps=6",
    "train.eval_every=2",
    "train.eval_steps=1",
    "logging.every_steps=1",
    "logging.tensorboard=false",
    "logging.progress=false",
    "checkpoint.every_steps=0",
]


class FakeBackend:
    """The Backend protocol with scripted losses; it records what the loop asked of it."""

    def __init__(
        self, losses: dict[int, float] | None = None, skipped: tuple[int, ...] = (), on_step: Any = None
    ):
        self.losses, self.skipped, self.on_step = losses or {}, skipped, on_step
        self.model = torch.nn.Linear(2, 2)  # what the checkpointer's finite check reads
        self.calls: list[tuple[str, Any]] = []
        self.measure_grads = False
        self.steps = 0

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats:
        assert micro_batches
        assert "input_ids" in micro_batches[0]
        self.steps += 1
        self.calls.append(("train", self.steps))
        if self.on_step is not None:
            self.on_step(self.steps)
        loss = self.losses.get(self.steps, 2.0)
        return StepStats(torch.tensor(loss), 1.0, self.steps in self.skipped)

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(("eval", self.steps))
        return torch.tensor(1.5)

    def loss_scale(self) -> float | None:
        return 512.0

    def skipped_steps(self) -> int:
        return sum(1 for s in self.skipped if s <= self.steps)

    def lr(self) -> float:
        return 1e-3

    def torch_optimizer(self) -> None:
        return None  # no optimizer: the optimizer audit has nothing to read

    def fp32_masters(self) -> list[Any]:
        return []

    def save(self, directory: Path) -> None:
        self.calls.append(("save", self.steps))
        (directory / "fake.json").write_text(json.dumps({"steps": self.steps}))

    def load(self, directory: Path, saved_world: int = 1) -> str | None:
        self.calls.append(("load", directory.name))
        self.steps = json.loads((directory / "fake.json").read_text())["steps"]
        return None

    def state_bytes(self) -> dict[str, int]:
        return {}


def small_plan(tmp_path: Path, *overrides: str) -> Plan:
    """The tiny BERT recipe on synthetic data, one process, runs under `tmp_path`."""
    return resolve(
        load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", *SMALL, *overrides]),
        Hardware(cpu_count=2),
    )


def loop_run(plan: Plan, tokens: data.Tokens, backend: FakeBackend, stop: Any = None) -> train.Run:
    """A train.Run of `plan` on `backend` in this process, restored from its run directory."""
    d = ranks.Dist(rank=0, world=1, local_rank=0, control=None)
    run_dir = RunDir.from_plan(plan)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(plan, run_dir, d)
    start = ckpt.restore(backend)  # type: ignore[arg-type]
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    return train.Run(
        plan=plan,
        backend=backend,  # type: ignore[arg-type]
        batches=data.Batches(tokens, rows.train, plan, 0),
        evals=data.Batches(tokens, rows.eval, plan, 0, evaluation=True),
        meter=Meter(plan, True, start),
        ckpt=ckpt,
        stop=stop or SimpleNamespace(signal=None),
        d=d,
        start=start,
        phases=train.Phases(),
    )
