"""`train.fit` in one process with a fake backend: no torch.distributed, no model, seconds in all.

The loop's contract: a stop request checkpoints and then exits; evaluation runs every
train.eval_every steps; a skipped fp16 step is an "overflow" event; a non-finite loss
stops the run before a checkpoint is sealed; a restore resumes at the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.worker import data, train
from launcher.worker.backends import StepStats
from launcher.worker.checkpointer import Checkpointer
from launcher.worker.metrics import Meter, NonFiniteLoss

ROOT = Path(__file__).resolve().parents[2]
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

    def save(self, directory: Path) -> None:
        self.calls.append(("save", self.steps))
        (directory / "fake.json").write_text(json.dumps({"steps": self.steps}))

    def load(self, directory: Path) -> None:
        self.calls.append(("load", directory.name))
        self.steps = json.loads((directory / "fake.json").read_text())["steps"]

    def state_bytes(self) -> dict[str, int]:
        return {}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _plan(tmp_path: Path, *overrides: str) -> Plan:
    return resolve(
        load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", *SMALL, *overrides]),
        Hardware(cpu_count=2),
    )


def _run(plan: Plan, tokens: data.Tokens, backend: FakeBackend, stop: Any = None) -> train.Run:
    d = train.Dist(rank=0, world=1, local_rank=0, control=None)
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


def _events(plan: Plan) -> list[tuple[str, int]]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [(r["event"], r["step"]) for r in map(json.loads, lines) if r["kind"] == "event"]


def _records(plan: Plan, kind: str) -> list[dict[str, Any]]:
    lines = RunDir.from_plan(plan).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _sealed(plan: Plan) -> list[int]:
    return RunDir.from_plan(plan).checkpoint_steps()


def test_a_stop_request_checkpoints_then_exits_and_a_restore_resumes_there(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = _plan(tmp_path)
    stop = SimpleNamespace(signal=None)
    backend = FakeBackend(on_step=lambda n: setattr(stop, "signal", signal.SIGTERM) if n == 3 else None)
    r = _run(plan, tokens, backend, stop)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert [c for c in backend.calls if c[0] != "eval"] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("save", 3),
    ]
    assert [e for e in _events(plan) if e[0] in ("checkpoint", "stop", "finish")] == [
        ("checkpoint", 3),
        ("stop", 3),
    ]
    assert _sealed(plan) == [3]
    assert RunDir.from_plan(plan).finished_step() is None

    again = FakeBackend()
    r = _run(plan, tokens, again)
    try:
        assert r.start == 3
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert again.calls[0] == ("load", checkpoint.step_dir(r.ckpt.root, 3).name)
    assert [c for c in again.calls if c[0] == "train"] == [("train", 4), ("train", 5), ("train", 6)]
    assert ("resume", 3) in _events(plan)
    assert _events(plan)[-1] == ("finish", 6)
    assert _sealed(plan) == [3, 6]
    assert RunDir.from_plan(plan).finished_step() == 6


def test_eval_cadence_checkpoint_cadence_and_overflow_events(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = _plan(tmp_path, "checkpoint.every_steps=4", "train.max_steps=8")
    backend = FakeBackend(skipped=(2, 5))
    r = _run(plan, tokens, backend)
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    assert [e["step"] for e in _records(plan, "eval")] == [2, 4, 6, 8]
    assert [c for c in backend.calls if c[0] == "eval"] == [
        ("eval", 2),
        ("eval", 4),
        ("eval", 6),
        ("eval", 8),
    ]
    overflows = [r for r in _records(plan, "event") if r["event"] == "overflow"]
    assert [(o["step"], o["loss_scale"]) for o in overflows] == [(2, 512.0), (5, 512.0)]
    assert [c[1] for c in backend.calls if c[0] == "save"] == [4, 8]
    assert _sealed(plan) == [4, 8]


@pytest.mark.parametrize("log_every", [1, 10])
def test_a_non_finite_loss_stops_before_a_checkpoint_is_sealed(
    tmp_path: Path, tokens: data.Tokens, log_every: int
) -> None:
    # Logged every step, the record of step 3 catches it; logged rarely, the save at step 4 does.
    plan = _plan(tmp_path, "checkpoint.every_steps=2", f"logging.every_steps={log_every}")
    backend = FakeBackend(losses={3: math.nan})
    r = _run(plan, tokens, backend)
    try:
        with pytest.raises(NonFiniteLoss):
            train.fit(r)
    finally:
        r.meter.close()
    assert [c[1] for c in backend.calls if c[0] == "save"] == [2]
    assert _sealed(plan) == [2]
    assert not list(RunDir.from_plan(plan).checkpoints.glob(".tmp-*"))
    assert RunDir.from_plan(plan).finished_step() is None


def _agree(rank: int, init: str, flags: list[list[bool]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    agreement = train.StopAgreement(train.Dist(rank, 2, rank, None))
    seen = [agreement.step(flag) for flag in flags[rank]]
    agreement.close()
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(seen))


def test_ranks_agree_to_stop_at_the_same_step_one_step_after_a_flag(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # Rank 1 is signalled during step 3 (index 2); rank 0 never is.
    flags = [[False] * 6, [False, False, True, True, True, True]]
    out = str(tmp_path / "seen")
    mp.spawn(_agree, args=(f"file://{tmp_path / 'rendezvous'}", flags, out), nprocs=2, join=True)
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] == [False, False, False, True, True, True]
    single = train.StopAgreement(train.Dist(0, 1, 0, None))
    assert [single.step(f) for f in (False, True)] == [False, True]  # one rank: at once
