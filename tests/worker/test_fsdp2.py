"""FSDP2 on the Accelerate backend (zero.stage 1-3): real engines on 2 CPU ranks over gloo.

Each test spawns the ranks (torch.multiprocessing), builds the engine from a plan as a worker
does, and writes what it saw to a JSON file per rank; the test then judges. The model is a small
BERT (vocabulary 1001, so the embedding's rows do not split evenly over 2 ranks).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate

VOCAB = 1001
FSDP2_SETTINGS = {
    "reshard_after_forward": True,
    "param_dtype": "bf16",
    "reduce_dtype": "fp32",
    "offload_params": False,
}
STEPS = 5
SAVED_AT = 3  # the checkpoint the resume tests load


def make_plan(tmp: Path, stage: int, dtype: str, world: int = 2, **extra: Any) -> Plan:
    raw: dict[str, Any] = {
        "name": "fsdp2",
        "model": {
            "name": "bert-mlm",
            "size": "tiny",
            "hidden_size": 64,
            "num_heads": 2,
            "intermediate_size": 128,
            "vocab_size": VOCAB,
            "dropout": 0.0,
            **extra.pop("model", {}),
        },
        "data": {"kind": "synthetic", "seq_len": 32, "num_samples": 256},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "grad_clip": 1.0, **extra.pop("train", {})},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"name": "constant", "warmup_steps": 0},
        # fp16: a loss scale that leaves the first steps' fp16 gradients finite.
        "precision": {"dtype": dtype, **({"loss_scale": {"initial": 1024.0}} if dtype == "fp16" else {})},
        "backend": "accelerate",
        "zero": {"stage": stage},
        "launch": {"device": "cpu", "nproc_per_node": world},
        "logging": {"dir": str(tmp), "tensorboard": False, "progress": False},
        **extra,
    }
    return resolve(validate(raw, "test"), Hardware(cpu_count=2))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s 16 rows: ids, and masked-LM labels on about 15 % of the positions."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (16, 32), generator=g)
    chosen = torch.rand(16, 32, generator=g) < 0.15
    return ids, torch.where(chosen, ids, torch.full_like(ids, -100))


def micro_batches(step: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of 4 rows of the step's global batch (grad_accum = 16 / 4 / world)."""
    ids, labels = global_batch(step)
    mine = slice(rank * 16 // world, (rank + 1) * 16 // world)
    return [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(ids[mine].split(4), labels[mine].split(4), strict=True)
    ]


def _init(rank: int, world: int, rendezvous: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")  # Accelerate reads them; unused
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _finish() -> None:
    """End a spawned rank once its results are written: after a barrier, exit at once. Tearing the
    gloo group and DCP's threads down at interpreter exit sometimes aborts ("terminate called
    without an active exception", SIGABRT), which would fail a run whose results are all in."""
    dist.barrier()
    os._exit(0)


def build(plan: Plan) -> Any:
    from launcher.worker.backends import load_backend
    from launcher.worker.model_setup import model_for

    torch.manual_seed(0)
    return load_backend(plan, model_for(plan)[0])


def train(engine: Any, steps: range, rank: int, world: int) -> list[float]:
    """The step losses (mean over ranks) of `steps`."""
    out = []
    for step in steps:
        loss = engine.train_step(micro_batches(step, rank, world)).loss.detach().clone()
        dist.all_reduce(loss)
        out.append(float(loss) / world)
    return out


def spawn(fn: Any, tmp: Path, world: int, *args: Any) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    rendezvous = tmp / f"rendezvous-{fn.__name__}-{world}"
    mp.spawn(fn, args=(world, str(rendezvous), str(tmp), *args), nprocs=world, join=True)
    return [json.loads((tmp / f"{fn.__name__}-{r}.json").read_text()) for r in range(world)]


def _write(tmp: str, name: str, rank: int, seen: dict[str, Any]) -> None:
    Path(tmp, f"{name}-{rank}.json").write_text(json.dumps(seen))


# --------------------------------------------------------------------------- which modules become units


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)


class Tied(torch.nn.Module):
    """Three blocks, the last one's weight tied to the head outside it."""

    _no_split_modules = ("Block",)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        self.head = torch.nn.Linear(4, 4)
        self.head.weight = self.blocks[2].linear.weight


def test_a_block_sharing_a_weight_with_the_outside_is_left_to_the_root() -> None:
    from launcher.worker.backends import fsdp2

    model = Tied()
    units, left = fsdp2.units_of(model, None)
    assert units == [model.blocks[1], model.blocks[0]]  # each before any unit holding it
    assert left == ["blocks.2"]
    line = fsdp2.describe([type(u).__name__ for u in units], left, FSDP2_SETTINGS)
    assert line == (
        "fsdp2: fully_shard on 2 x Block + root (reshard_after_forward=True, param_dtype=bf16, "
        "reduce_dtype=fp32, offload_params=False); left to the root, as they share a weight with "
        "modules outside them: blocks.2"
    )


def test_units_are_the_familys_block_else_the_models_own_list_else_transformers_layers() -> None:
    from transformers import BertConfig, BertForMaskedLM

    from launcher.worker.backends import fsdp2

    bert = BertForMaskedLM(
        BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=3, num_attention_heads=2)
    )
    # transformers lists BertEmbeddings too, whose word embeddings are the tied MLM decoder's weight.
    assert set(bert._no_split_modules) == {"BertEmbeddings", "BertLayer"}
    units, left = fsdp2.units_of(bert, None)
    assert [type(u).__name__ for u in units] == ["BertLayer"] * 3
    assert left == ["bert.embeddings"]
    wrapped = torch.nn.Sequential(bert)  # lists none: transformers' GradientCheckpointingLayers
    assert [type(u).__name__ for u in fsdp2.units_of(wrapped, None)[0]] == ["BertLayer"] * 3
    assert [type(u).__name__ for u in fsdp2.units_of(bert, "BertLayer")[0]] == ["BertLayer"] * 3
    assert fsdp2.units_of(bert, "") == ([], [])  # a family without blocks: the root alone
    assert fsdp2.units_of(torch.nn.Sequential(torch.nn.Linear(2, 2)), None) == ([], [])
    line = fsdp2.describe([], [], {**FSDP2_SETTINGS, "param_dtype": "fp32"})
    assert line.startswith(
        "fsdp2: fully_shard on the root alone (reshard_after_forward=True, param_dtype=fp32"
    )


# --------------------------------------------------------------------------- the sharding as applied


def _layout(rank: int, world: int, rendezvous: str, tmp: str, stage: int, dtype: str) -> None:
    from torch.distributed.tensor import DTensor, Shard

    from launcher.worker.backends import fsdp2

    _init(rank, world, rendezvous)
    plan = make_plan(Path(tmp), stage, dtype)
    engine = build(plan)
    params = dict(engine.model.named_parameters())
    layout = {
        name: {
            "dtensor": isinstance(p, DTensor),
            "shard0": isinstance(p, DTensor) and p.placements == (Shard(0),),
            "dtype": str(p.dtype),
            "rows": p.shape[0],
            "numel": p.numel(),
            "local_numel": fsdp2.local(p).numel(),
            "local_rows": fsdp2.local(p).shape[0],
        }
        for name, p in params.items()
    }
    # What a block computes with, and whether stage 3 frees its gathered weights after forward.
    block = engine.model.lm.bert.encoder.layer[0]
    during: dict[str, Any] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        during["weight_dtype"] = str(module.weight.dtype)
        during["weight_dtensor"] = isinstance(module.weight, DTensor)

    handle = block.attention.self.query.register_forward_hook(hook)
    with engine.precision.autocast():
        loss = engine.model(**micro_batches(1, rank, world)[0])
    after_forward = isinstance(block.attention.self.query.weight, DTensor)
    loss.backward()
    engine.inner.zero_grad(set_to_none=True)
    handle.remove()
    # x-ray shards: each starts where its part of the whole parameter does (gradients set to the weights).
    engine.train_step(micro_batches(1, rank, world))
    for p in params.values():
        p.grad = p.detach().clone()
    offsets_right = []
    for p, s in zip(params.values(), fsdp2.shards(engine.model), strict=True):
        whole = p.detach().full_tensor().reshape(-1)
        offsets_right.append(bool(torch.equal(whole[s.offset : s.offset + s.grad.numel()], s.grad)))
    engine.inner.zero_grad(set_to_none=True)
    _write(
        tmp,
        "_layout",
        rank,
        {
            "sharded": engine.sharded,
            "layout": layout,
            "during": during,
            "after_forward": after_forward,
            "offsets_right": offsets_right,
            "state_bytes": engine.state_bytes(),
            "printed": plan.backend_config["fsdp2"],
        },
    )
    _finish()


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "dtype"), [(3, "fp32"), (3, "bf16"), (2, "bf16")])
def test_each_rank_holds_its_share_of_every_parameter_as_the_plan_says(
    tmp_path: Path, stage: int, dtype: str
) -> None:
    seen = spawn(_layout, tmp_path, 2, stage, dtype)
    printed = seen[0]["printed"]
    assert printed == {
        "reshard_after_forward": stage == 3,
        "param_dtype": dtype,
        "reduce_dtype": "fp32",
        "offload_params": False,
        "wrap": "each BertLayer, then the root",
    }
    # The worker's record of what it applied says the same as the dry run.
    assert seen[0]["sharded"] == (
        f"fsdp2: fully_shard on 2 x BertLayer + root (reshard_after_forward={stage == 3}, "
        f"param_dtype={dtype}, reduce_dtype=fp32, offload_params=False)"
    )
    for rank, mine in enumerate(seen):
        for name, p in mine["layout"].items():
            assert p["dtensor"], name
            assert p["shard0"], name
            assert p["dtype"] == "torch.float32", name  # the shards are the fp32 masters
            share = math.ceil(p["rows"] / 2)  # torch.chunk's rows
            assert p["local_rows"] == min(share, p["rows"] - rank * share), name
        locals_ = [sum(m["layout"][n]["local_numel"] for m in seen) for n in mine["layout"]]
        assert locals_ == [p["numel"] for p in mine["layout"].values()]  # nothing held twice
        # The block computes with weights gathered in the 16-bit dtype (fp32 without a policy).
        assert mine["during"] == {
            "weight_dtype": "torch.float32" if dtype == "fp32" else "torch.bfloat16",
            "weight_dtensor": False,
        }
        # Stage 3 frees a block's gathered weights after its forward; stage 2 keeps them for backward.
        assert mine["after_forward"] is (stage == 3)
        assert mine["offsets_right"] == [True] * len(mine["layout"])
    total = sum(p["numel"] for p in seen[0]["layout"].values())
    word = seen[0]["layout"]["lm.bert.embeddings.word_embeddings.weight"]
    assert word["local_rows"] == 501
    assert seen[1]["layout"]["lm.bert.embeddings.word_embeddings.weight"]["local_rows"] == 500
    for mine in seen:  # about half of the fp32 parameters, gradients and Adam moments on each rank
        held = mine["state_bytes"]
        assert held["master"] == 0
        assert 0.45 < held["params"] / (4 * total) < 0.55, held
        assert 0.9 < held["optimizer"] / (8 * total) * 2 < 1.1, held


# --------------------------------------------------------------------------- numbers, checkpoints, resharding


def _train_save_resume(rank: int, world: int, rendezvous: str, tmp: str) -> None:
    from launcher.worker import audit

    _init(rank, world, rendezvous)
    ddp = build(make_plan(Path(tmp), 0, "fp32"))
    ddp_losses = train(ddp, range(1, STEPS + 1), rank, world)
    plan = make_plan(Path(tmp), 3, "fp32")
    engine = build(plan)
    first = audit.FirstUpdate(engine)
    losses = train(engine, range(1, 2), rank, world)
    ratios, _ = first.ratios()
    events = first.events(engine.skipped_steps(), plan)
    losses += train(engine, range(2, SAVED_AT + 1), rank, world)
    directory = Path(tmp, "checkpoint")
    directory.mkdir(exist_ok=True)
    dist.barrier()
    engine.save(directory)
    whole = {n: p.detach().full_tensor() for n, p in engine.model.named_parameters()}
    if rank == 0:
        torch.save(whole, Path(tmp, "whole.pt"))
    losses += train(engine, range(SAVED_AT + 1, STEPS + 1), rank, world)
    again = build(plan)  # a fresh run resuming at the same world size
    note = again.load(directory, 2)
    resumed = train(again, range(SAVED_AT + 1, STEPS + 1), rank, world)
    counters = audit.counter_events(again.torch_optimizer(), STEPS, 0, plan)
    _write(
        tmp,
        "_train_save_resume",
        rank,
        {
            "ddp": ddp_losses,
            "fsdp2": losses,
            "resumed": resumed,
            "note": note,
            "first_update": [float(ratios.median()), len(ratios)],
            "audit_events": events + counters,
            "files": sorted(p.name for p in (directory / "dcp").iterdir()),
        },
    )
    _finish()


def _resume_on_one(rank: int, world: int, rendezvous: str, tmp: str) -> None:
    _init(rank, world, rendezvous)
    engine = build(make_plan(Path(tmp), 3, "fp32", world=1))
    note = engine.load(Path(tmp, "checkpoint"), 2)
    losses = train(engine, range(SAVED_AT + 1, STEPS + 1), rank, world)
    _write(tmp, "_resume_on_one", rank, {"note": note, "losses": losses})
    _finish()


@pytest.mark.slow
def test_fsdp2_trains_saves_and_resumes_at_any_world_size(tmp_path: Path) -> None:
    from launcher.worker.backends import accelerate as acc_backend

    seen = spawn(_train_save_resume, tmp_path, 2)
    got = seen[0]
    # FSDP2's reduce-scatter averages as DDP's all-reduce does: the same losses as stage 0, in fp32.
    worst = max(abs(a - b) / b for a, b in zip(got["fsdp2"], got["ddp"], strict=True))
    assert worst < 1e-5, (got["fsdp2"], got["ddp"])
    assert got["fsdp2"][0] != got["fsdp2"][-1]  # it trains
    # The same world size loads bit for bit: the resumed steps equal the uninterrupted ones.
    assert got["resumed"] == got["fsdp2"][SAVED_AT:]
    assert got["note"] is None
    # Each rank wrote its own shard file; rank 0 the metadata.
    assert got["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # The optimizer audit reads DTensor masters and moments: Adam's first update is 1.0 per element.
    median, count = got["first_update"]
    assert count > 1000
    assert median == pytest.approx(1.0, abs=0.02)
    assert got["audit_events"] == []

    one = spawn(_resume_on_one, tmp_path, 1)[0]
    assert one["note"] == "FSDP2 shards resharded by torch.distributed.checkpoint from 2 ranks to 1"
    worst = max(abs(a - b) / b for a, b in zip(one["losses"], got["fsdp2"][SAVED_AT:], strict=True))
    assert worst < 1e-5, (one["losses"], got["fsdp2"])

    # Export reads the DCP checkpoint in one process, under the trained module's names.
    plan = make_plan(tmp_path, 3, "fp32")
    merged = acc_backend.consolidate_fp32(tmp_path / "checkpoint", plan)
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert set(whole) <= set(merged)
    assert all(torch.equal(merged[n], whole[n]) for n in whole)


# --------------------------------------------------------------------------- fp16 loss scaling


def _fp16_overflow(rank: int, world: int, rendezvous: str, tmp: str) -> None:
    from launcher.worker.backends import fsdp2

    _init(rank, world, rendezvous)
    engine = build(make_plan(Path(tmp), 3, "fp16"))
    normal = engine.train_step(micro_batches(1, rank, world))
    unscale = engine.precision.unscale_

    def poisoned(optimizer: torch.optim.Optimizer) -> None:
        if rank == 1:  # an overflow in this rank's shard only
            grad = next(p.grad for p in engine.model.parameters() if p.grad is not None)
            fsdp2.local(grad).view(-1)[0] = float("inf")
        unscale(optimizer)

    engine.precision.unscale_ = poisoned
    before = [fsdp2.local(p.detach()).clone() for p in engine.model.parameters()]
    overflow = engine.train_step(micro_batches(2, rank, world))
    moved = any(
        not torch.equal(b, fsdp2.local(p.detach()))
        for b, p in zip(before, engine.model.parameters(), strict=True)
    )
    engine.precision.unscale_ = unscale
    after = engine.train_step(micro_batches(3, rank, world))
    _write(
        tmp,
        "_fp16_overflow",
        rank,
        {
            "skipped": [normal.skipped, overflow.skipped, after.skipped],
            "moved": moved,
            "skipped_steps": engine.skipped_steps(),
            "losses": [float(s.loss) for s in (normal, overflow, after)],
        },
    )
    _finish()


@pytest.mark.slow
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    seen = spawn(_fp16_overflow, tmp_path, 2)
    for mine in seen:
        assert mine["skipped"] == [False, True, False]
        assert mine["moved"] is False  # no rank stepped with the other's overflow
        assert mine["skipped_steps"] == 1
        assert all(math.isfinite(x) for x in mine["losses"])


# --------------------------------------------------------------------------- LoRA and activation checkpointing


def _lora_checkpointing(rank: int, world: int, rendezvous: str, tmp: str) -> None:
    from torch.distributed.tensor import DTensor

    from launcher.worker.backends import fsdp2

    _init(rank, world, rendezvous)
    runs = {}
    for recompute in (False, True):
        plan = make_plan(
            Path(tmp), 3, "fp32", model={"lora": {"rank": 4}}, train={"activation_checkpointing": recompute}
        )
        engine = build(plan)
        named = dict(engine.model.named_parameters())
        before = {n: fsdp2.local(p.detach()).clone() for n, p in named.items()}
        losses = train(engine, range(1, 4), rank, world)
        runs[str(recompute)] = {
            "sharded": engine.sharded,
            "losses": losses,
            "all_dtensor": all(isinstance(p, DTensor) for p in named.values()),
            "trainable": sorted(n for n, p in named.items() if p.requires_grad),
            "moved": sorted(
                n for n, p in named.items() if not torch.equal(before[n], fsdp2.local(p.detach()))
            ),
            "optimized": sum(len(g["params"]) for g in engine.inner.param_groups),
        }
    _write(tmp, "_lora_checkpointing", rank, runs)
    _finish()


@pytest.mark.slow
def test_lora_and_activation_checkpointing_train_under_fsdp2(tmp_path: Path) -> None:
    runs = spawn(_lora_checkpointing, tmp_path, 2)[0]
    plain, recomputed = runs["False"], runs["True"]
    assert plain["sharded"].startswith("fsdp2: fully_shard on 2 x BertLayer + root")
    assert plain["all_dtensor"]  # frozen base weights and adapters are sharded alike
    assert plain["trainable"]
    assert all("lora_" in n for n in plain["trainable"])
    assert plain["optimized"] == len(plain["trainable"])
    # The adapters train (each rank's shard of them moved); the frozen weights do not move.
    assert set(plain["moved"]) <= set(plain["trainable"])
    assert any(".lora_B." in n for n in plain["moved"])
    # Recomputing each block in backward gathers its weights again: the same numbers.
    assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-6)


# --------------------------------------------------------------------------- torch.compile


def _compiled(rank: int, world: int, rendezvous: str, tmp: str) -> None:
    _init(rank, world, rendezvous)
    runs = {}
    for compiled in (False, True):
        engine = build(make_plan(Path(tmp), 3, "fp32", train={"compile": compiled}))
        runs[str(compiled)] = {"losses": train(engine, range(1, 4), rank, world), "sharded": engine.sharded}
    _write(tmp, "_compiled", rank, runs)
    _finish()


@pytest.mark.slow
def test_train_compile_works_under_fsdp2(tmp_path: Path) -> None:
    # The model is compiled in place before fully_shard (as at stage 0); dynamo runs FSDP2's hooks eagerly.
    runs = spawn(_compiled, tmp_path, 2)[0]
    assert runs["True"]["sharded"] == runs["False"]["sharded"]
    assert runs["True"]["losses"] == pytest.approx(runs["False"]["losses"], rel=1e-4)
