"""A DeepSpeed checkpoint loaded at another world size (launcher.worker.backends.universal).

Real engines on CPU in one process (gloo, world 1). A checkpoint written by this one rank is loaded
as one written by 2 (`saved_world=2`): the partitioned ones (ZeRO 1-3) then go through DeepSpeed's
universal checkpoint, exactly as at a real resize, and must give back the very state that was saved;
the whole ones (stage 0) load as saved. Real resizes (2 -> 1, 2 -> 4) run in tests/e2e.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate
from launcher.rundir import checkpoint
from launcher.worker.backends import ReshardError, load_backend, universal
from launcher.worker.model_setup import model_for
from tests.faults import flip_bytes, truncate
from tests.one_rank import one_rank_world

CPU = Hardware(gpus=(), cpu_count=2)
TAG = "deepspeed"
SAVED_WORLD = 2


@pytest.fixture(scope="module", autouse=True)
def _one_process_group() -> Iterator[None]:
    """A one-process gloo group for the module, as torchrun sets it up for a world of 1 (DeepSpeed keeps
    the first group it sees for the process's life). Importing deepspeed and torch's first optimizer
    step set environment variables for good: both happen here, before the per-test env-leak check."""
    with one_rank_world():
        yield


def make_plan(tmp_path: Path, dtype: str, stage: int) -> Plan:
    raw = {
        "name": "resize",
        "model": {"name": "tiny-mlp", "dropout": 0.0},
        "data": {"kind": "synthetic", "seq_len": 16, "num_samples": 64},
        "train": {"micro_batch_size": 4, "global_batch_size": 4, "max_steps": 20},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.1},
        "scheduler": {"warmup_steps": 3, "name": "linear"},
        "precision": {"dtype": dtype},
        "zero": {"stage": stage},
        "launch": {"device": "cpu", "nproc_per_node": 1},
        "logging": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
        "backend": "deepspeed",
    }
    return resolve(validate(raw, "test"), CPU)


def batch(plan: Plan, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, plan.shape.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "labels": ids.clone()}]


def build(plan: Plan) -> Any:
    """The backend over a freshly initialised model that also holds a persistent buffer (model state
    that is no parameter, such as a running statistic)."""
    torch.manual_seed(0)
    model = model_for(plan)[0]
    model.register_buffer("seen", torch.zeros(3))
    return load_backend(plan, model)


def trained_checkpoint(tmp_path: Path, plan: Plan, steps: int = 3) -> tuple[Any, Path]:
    """An engine trained `steps` steps and its checkpoint, sealed as the checkpointer seals one
    (every file listed with its size and CRC-32 in the manifest)."""
    engine = build(plan)
    for i in range(steps):
        engine.train_step(batch(plan, i))
    engine.engine.module.seen.copy_(torch.tensor([1.0, 2.0, 3.0]))
    root = tmp_path / "checkpoints"
    tmp = checkpoint.begin(root, steps)
    engine.save(tmp)
    files = checkpoint.merge_checksums(tmp, checkpoint.list_files(tmp))
    manifest = {"step": steps, "world_size": SAVED_WORLD, "files": files}
    return engine, checkpoint.commit(tmp, manifest, keep=5)


def state(engine: Any) -> dict[str, Any]:
    """Everything a resume must give back: masters, Adam's moments and counters, the module's
    parameters and buffers, the engine's step counters and the LR schedule."""
    opt = engine.torch_optimizer()
    return {
        "masters": [m.detach().clone() for m, _ in engine.fp32_masters()],
        "adam": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()
        ],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "module": {k: v.detach().clone() for k, v in engine.engine.module.state_dict().items()},
        "counters": (engine.engine.global_steps, engine.engine.global_samples, engine.skipped_steps()),
        "schedule": (engine.engine.lr_scheduler.last_epoch, engine.lr()),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


PARTITIONED = [("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 1), ("bf16", 2), ("bf16", 3)]


@pytest.mark.parametrize(("dtype", "stage"), PARTITIONED, ids=[f"{d}-zero{s}" for d, s in PARTITIONED])
def test_a_partitioned_checkpoint_loads_through_the_universal_checkpoint_exactly(
    tmp_path: Path, dtype: str, stage: int
) -> None:
    plan = make_plan(tmp_path, dtype, stage)
    saved, step_dir = trained_checkpoint(tmp_path, plan)
    assert universal.partitioned(step_dir / TAG)

    resumed = build(plan)
    note = resumed.load(step_dir, SAVED_WORLD)

    assert note is not None
    assert note.startswith("converted to DeepSpeed's universal checkpoint in ")
    assert note.endswith("s (kept in step-00000003/universal)")
    assert resumed.engine._config.load_universal_checkpoint is False  # on for that one load only
    assert_same(state(saved), state(resumed))
    # and the next step is the very step the saved engine takes
    losses = [float(e.train_step(batch(plan, 7)).loss) for e in (saved, resumed)]
    assert losses[0] == losses[1]
    assert_same(state(saved), state(resumed))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_stage0_checkpoint_is_whole_and_loads_as_saved(tmp_path: Path, dtype: str) -> None:
    # DeepSpeed 0.19.8 runs stage 0 with torch's AdamW in fp32 and its FP16_UnfusedOptimizer in bf16
    # on CPU: nothing in either is split by rank.
    plan = make_plan(tmp_path, dtype, 0)
    saved, step_dir = trained_checkpoint(tmp_path, plan)
    assert not universal.partitioned(step_dir / TAG)

    resumed = build(plan)
    assert resumed.load(step_dir, SAVED_WORLD) is None
    assert not (step_dir / universal.FOLDER).exists()
    assert_same(state(saved), state(resumed))


def test_the_kept_copy_is_verified_reused_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "fp32", 2)
    saved, step_dir = trained_checkpoint(tmp_path, plan)
    expected = state(saved)
    kept = step_dir / universal.FOLDER
    assert build(plan).load(step_dir, SAVED_WORLD).startswith("converted")
    made = json.loads((kept / checkpoint.MANIFEST).read_text())
    assert made["saved_world"] == SAVED_WORLD
    assert {e["path"] for e in made["files"]} == {n for n, _ in checkpoint.list_files(kept)}

    again = build(plan)
    note = again.load(step_dir, SAVED_WORLD)
    assert note.startswith("reused DeepSpeed's universal checkpoint in step-00000003/universal (verified in ")
    assert_same(expected, state(again))

    flip_bytes(kept / TAG / "zero" / "head.weight" / "exp_avg.pt")
    (step_dir / ".tmp-universal").mkdir()  # and a conversion that was interrupted
    rebuilt = build(plan)
    note = rebuilt.load(step_dir, SAVED_WORLD)
    assert note.startswith("converted to DeepSpeed's universal checkpoint in ")
    assert "; the kept copy was rebuilt: " + f"{TAG}/zero/head.weight/exp_avg.pt: crc32 " in note
    assert_same(expected, state(rebuilt))
    assert not (step_dir / ".tmp-universal").exists()

    made = json.loads((kept / checkpoint.MANIFEST).read_text())
    made["source"][0]["crc32"] = "00000000"
    checkpoint.write_atomic(kept / checkpoint.MANIFEST, json.dumps(made))
    note = build(plan).load(step_dir, SAVED_WORLD)
    assert note.endswith("the kept copy was rebuilt: made from other files than the checkpoint's")


def test_the_copy_leaves_the_checkpoint_verifying_and_is_pruned_with_it(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "fp32", 1)
    _, step_dir = trained_checkpoint(tmp_path, plan)
    build(plan).load(step_dir, SAVED_WORLD)
    manifest = checkpoint.read_manifest(step_dir)
    assert not any(e["path"].startswith(universal.FOLDER) for e in manifest["files"])
    assert checkpoint.check_sizes(step_dir, manifest) is None
    assert checkpoint.check_checksums(step_dir, manifest, [n for n, _ in checkpoint.listed(manifest)]) is None
    assert checkpoint.find_latest(step_dir.parent).path == step_dir

    later = checkpoint.begin(step_dir.parent, 9)
    (later / "x").write_text("x")
    checkpoint.commit(later, {"step": 9, "files": checkpoint.merge_checksums(later, [("x", 1)])}, keep=1)
    assert not step_dir.exists()
    assert [p.name for p in step_dir.parent.iterdir() if p.is_dir()] == ["step-00000009"]


def test_a_conversion_that_fails_is_one_line_naming_the_size_that_loads_it(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "fp32", 2)
    _, step_dir = trained_checkpoint(tmp_path, plan)
    (optim,) = (step_dir / TAG).glob("*_optim_states.pt")
    truncate(optim)  # what the checkpointer's verification stops first; here it reaches the converter
    with pytest.raises(ReshardError) as caught:
        build(plan).load(step_dir, SAVED_WORLD)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("DeepSpeed's ds_to_universal could not convert step-00000003 (")
    assert message.endswith(
        "); resume on 2 ranks (launch.nnodes x launch.nproc_per_node), the world size that wrote it, "
        "which loads it as it is"
    )
    assert not (step_dir / universal.FOLDER).exists()
    assert not (step_dir / ".tmp-universal").exists()


def test_at_the_size_that_wrote_it_nothing_is_converted(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, "fp32", 3)
    saved, step_dir = trained_checkpoint(tmp_path, plan)
    resumed = build(plan)
    assert resumed.load(step_dir, 1) is None
    assert not (step_dir / universal.FOLDER).exists()
    assert_same(state(saved), state(resumed))


@pytest.mark.parametrize(
    ("failing", "error", "expected"),
    [
        (
            "_convert",
            ValueError("bad shard\nmore"),
            "converting to DeepSpeed's universal checkpoint failed (ValueError: bad shard); ",
        ),
        (
            "checkpoint.write_atomic",
            OSError(28, "No space left on device"),
            "cannot write DeepSpeed's universal checkpoint into ",
        ),
    ],
    ids=["unexpected", "disk-full"],
)
def test_any_failure_while_converting_is_one_line_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, error: Exception, expected: str
) -> None:
    plan = make_plan(tmp_path, "fp32", 1)
    _, step_dir = trained_checkpoint(tmp_path, plan)
    engine = build(plan)

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(universal if failing == "_convert" else checkpoint, failing.split(".")[-1], fail)
    with pytest.raises(ReshardError) as caught:
        engine.load(step_dir, SAVED_WORLD)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected)
    assert message.endswith(
        "resume on 2 ranks (launch.nnodes x launch.nproc_per_node), the world size that "
        "wrote it, which loads it as it is"
    )
    assert not (step_dir / universal.FOLDER).exists()
    assert not (step_dir / ".tmp-universal").exists()
