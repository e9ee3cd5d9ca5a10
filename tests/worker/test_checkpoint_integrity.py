"""The checkpointer's checks in one process: the parameter check catches NaN, inf and absurd
weights; restore falls back past a bad checkpoint and refuses when none is left."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from launcher.plan.resolve import Plan
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.worker import data, ranks, train
from launcher.worker.checkpointer import Checkpointer, parameter_square_sum
from launcher.worker.metrics import Meter
from tests.fake_loop import FakeBackend, loop_run, small_plan
from tests.faults import flip_bytes, truncate
from tests.runs import records


def _holding(*values: float, ds_tensor: bool = False) -> SimpleNamespace:
    model = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))
    if ds_tensor:  # as ZeRO-3: the parameter itself is empty, the rank's partition is ds_tensor
        weight = model.weight
        # One rank holds it all, padded to a partition size as ZeRO-3 pads, with garbage there.
        part = torch.cat([weight.data.clone().flatten(), torch.full((3,), float("nan"))])
        part.ds_numel = part.numel()  # type: ignore[attr-defined]
        weight.ds_tensor = part  # type: ignore[attr-defined]
        weight.ds_numel = len(values)  # type: ignore[attr-defined]
        weight.data = torch.empty(0)
    return SimpleNamespace(model=model)


@pytest.mark.parametrize("ds_tensor", [False, True])
def test_the_parameter_check_catches_nan_inf_and_weights_beyond_1e19(ds_tensor: bool) -> None:
    # With ds_tensor the partition's NaN padding (uninitialised memory in ZeRO-3) is left out.
    assert parameter_square_sum(_holding(3.0, 4.0, ds_tensor=ds_tensor)) == pytest.approx(25.0)
    assert parameter_square_sum(_holding(1e18, -1e18, ds_tensor=ds_tensor)) == pytest.approx(2e36, rel=1e-5)
    for bad in (float("nan"), float("inf"), -float("inf"), 1e20, 1e37):
        square_sum = parameter_square_sum(_holding(1.0, bad, ds_tensor=ds_tensor))
        assert not torch.isfinite(torch.tensor(square_sum)), bad


def test_the_parameter_check_reads_16_bit_parameters_in_fp32() -> None:
    backend = _holding(*[300.0] * 100_000)  # a norm of about 95000: past fp16's largest number
    backend.model.to(torch.float16)
    assert parameter_square_sum(backend) == pytest.approx(9e9, rel=1e-3)
    backend = _holding(3e18, 3e18)
    backend.model.to(torch.bfloat16)
    assert torch.isfinite(torch.tensor(parameter_square_sum(backend)))
    backend = _holding(3e19, 1.0)
    backend.model.to(torch.bfloat16)
    assert not torch.isfinite(torch.tensor(parameter_square_sum(backend)))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(small_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _trained(tmp_path: Path, tokens: data.Tokens, steps: int = 4, shared: Path | None = None) -> Plan:
    """A plan whose run sealed checkpoints at steps 2 and 4 (world size 1, a fake backend);
    `shared`: its checkpoint.dir."""
    where = [f"checkpoint.dir={shared}"] if shared else []
    plan = small_plan(
        tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3", f"train.max_steps={steps}", *where
    )
    r = loop_run(plan, tokens, FakeBackend())
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    return plan


def _restore(plan: Plan, backend: FakeBackend) -> tuple[Checkpointer, int]:
    ckpt = Checkpointer(plan, RunDir.from_plan(plan), ranks.Dist(rank=0, world=1, local_rank=0, control=None))
    return ckpt, ckpt.restore(backend)  # type: ignore[arg-type]


def test_restore_falls_back_past_a_bad_checkpoint_and_reports_it(
    tmp_path: Path, tokens: data.Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _trained(tmp_path, tokens)
    root = RunDir.from_plan(plan).checkpoints
    flip_bytes(root / "step-00000004" / "fake.json", count=1)
    backend = FakeBackend()
    ckpt, start = _restore(plan, backend)
    assert start == 2
    assert backend.calls == [("load", "step-00000002")]  # the bad one was never loaded
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1
    assert said[0].startswith("mplaunch: warning: checkpoint step-00000004 failed verification on rank 0: ")
    assert "fake.json: crc32 " in said[0]
    assert (root / "corrupt-step-00000004" / "rejected-by-rank-0.txt").is_file()
    meter = Meter(plan, True, start)
    ckpt.report(meter)
    meter.close()
    rejected = [r for r in records(Path(plan.run_dir), "event") if r["event"] == "checkpoint_rejected"]
    assert [(r["step"], r["path"]) for r in rejected] == [(4, str(root / "corrupt-step-00000004"))]


def test_a_checkpoint_that_verifies_but_does_not_load_is_skipped(
    tmp_path: Path, tokens: data.Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    class Unloadable(FakeBackend):
        def load(self, directory: Path, saved_world: int = 1) -> str | None:
            if directory.name == "step-00000004":
                raise RuntimeError("PytorchStreamReader failed reading zip archive\n(a long torch error)")
            return super().load(directory, saved_world)

    plan = _trained(tmp_path, tokens)
    _, start = _restore(plan, Unloadable())
    assert start == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [
        "mplaunch: warning: checkpoint step-00000004 failed verification on rank 0: cannot be loaded "
        "(RuntimeError: PytorchStreamReader failed reading zip archive); renamed to corrupt-step-00000004, "
        "trying an older checkpoint"
    ]


def test_with_every_checkpoint_bad_restore_refuses_instead_of_starting_afresh(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = _trained(tmp_path, tokens)
    root = RunDir.from_plan(plan).checkpoints
    for step in (2, 4):
        truncate(checkpoint.step_dir(root, step) / "rng-rank0.pt")
    with pytest.raises(ValueError, match="passed verification") as refused:
        _restore(plan, FakeBackend())
    assert (
        "nothing was trained, and running the same recipe again is refused until they are moved away"
        in str(refused.value)
    )
    assert sorted(p.name for p in root.glob("corrupt-*")) == [
        "corrupt-step-00000002",
        "corrupt-step-00000004",
    ]
    # Started again without the launcher (a Slurm job's restart): still no fresh start beside them.
    backend = FakeBackend()
    with pytest.raises(ValueError, match="passed verification"):
        _restore(plan, backend)
    assert backend.calls == []
    # Told to start afresh, it does.
    assert _restore(small_plan(tmp_path, "checkpoint.resume=never"), FakeBackend())[1] == 0


def test_restore_never_takes_a_checkpoint_another_run_wrote(tmp_path: Path, tokens: data.Tokens) -> None:
    # Two runs named alike under different logging.dirs share checkpoint.dir/NAME.
    shared = tmp_path / "shared"
    first = _trained(tmp_path / "x", tokens, shared=shared)
    second = small_plan(tmp_path / "y", f"checkpoint.dir={shared}", "checkpoint.every_steps=2")
    backend = FakeBackend()
    with pytest.raises(ValueError, match=f"the run {first.run_dir} wrote it") as refused:
        _restore(second, backend)
    assert str(shared / "bert-tiny-mlm" / "step-00000004") in str(refused.value)
    assert backend.calls == []
    assert _restore(first, FakeBackend())[1] == 4
