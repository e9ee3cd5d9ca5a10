"""FSDP2 (backend accelerate, zero.stage 1-3) in real 2-rank CPU runs of the tiny BERT, as a user runs them.

One fp32 ZeRO-3 run of each backend is shared (module fixture): the loss curves and step-1 gradient
sketches agree, each rank holds half of the parameters, and the worker shards what the dry run says.
Around it: a bitwise resume through the DCP checkpoint, a resume on 1 rank, export, parity, and a few
steps in bf16, in fp16 with loss scaling, and with LoRA and activation checkpointing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.plan.resolve import Plan
from launcher.worker import models
from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

STEPS = 6
SHARED = {
    "train": {"max_steps": STEPS},
    "scheduler": {"name": "constant"},
    "checkpoint": {"every_steps": 3, "keep": 3},
    "logging": {"precision_every": 3, "memory_report": True},
}
FSDP2 = {"backend": "accelerate", "zero": {"stage": 3}}


@dataclass(frozen=True)
class Run:
    run_dir: Path
    recipe: Path
    stdout: str

    @property
    def plan(self) -> Plan:
        return Plan.from_json((self.run_dir / "plan.json").read_text())

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step-{step:08d}"


def train(tmp: Path, name: str, *layers: dict[str, Any], args: tuple[str, ...] = ()) -> Run:
    recipe = write_recipe(tmp, name, FAST, SHARED, *layers)
    result = mplaunch(str(recipe), *args)
    assert result.returncode == 0, explain(result)
    return Run(tmp / "runs" / name, recipe, result.stdout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def fsdp2(workdir: Path) -> Run:
    return train(workdir, "fsdp2", FSDP2)


@pytest.fixture(scope="module")
def zero3(workdir: Path) -> Run:
    return train(workdir, "zero3", {"backend": "deepspeed", "zero": {"stage": 3}})


def dcp_state(directory: Path) -> dict[str, Any]:
    """Everything a DCP checkpoint holds, read back whole by torch's own converter."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, Path(tmp) / "whole.pt")
        state: dict[str, Any] = torch.load(Path(tmp) / "whole.pt", weights_only=False)
    return state


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def test_fsdp2_zero3_matches_deepspeed_zero3_and_holds_half_the_model_on_each_rank(
    fsdp2: Run, zero3: Run
) -> None:
    ours, theirs = losses(fsdp2.run_dir), losses(zero3.run_dir)
    assert sorted(ours) == list(range(1, STEPS + 1))
    worst = max(abs(ours[s] - theirs[s]) / theirs[s] for s in ours)
    assert worst < 1e-4, (ours, theirs)
    # The step-1 x-ray: every gradient element counted once, the shards' sketches add up to
    # DeepSpeed's (FSDP2's shards start where torch.chunk puts them).
    mine, ds = (
        records(fsdp2.run_dir, "precision")[0]["layers"],
        records(zero3.run_dir, "precision")[0]["layers"],
    )
    assert mine.keys() == ds.keys()
    for name, row in mine.items():
        assert row["elements"] == ds[name]["elements"], name
        ref = torch.tensor(ds[name]["sketch"])
        assert float((torch.tensor(row["sketch"]) - ref).norm() / ref.norm()) < 1e-4, name
    # Each rank holds about half of the fp32 parameters, gradients and AdamW moments.
    whole = 4 * sum(row["elements"] for row in ds.values())
    for rank in (0, 1):
        held = json.loads((fsdp2.run_dir / "memory" / f"rank-{rank}.json").read_text())["bytes"]
        assert 0.49 < held["params"] / whole < 0.51, held
        assert 0.49 < held["grads"] / whole < 0.51, held
        assert 0.49 < held["optimizer"] / (2 * whole) < 0.51, held
        assert held["master"] == 0


def test_the_worker_shards_what_the_dry_run_prints(fsdp2: Run) -> None:
    dry = mplaunch(str(fsdp2.recipe), "--dry-run")
    assert dry.returncode == 0, explain(dry)
    settings = json.loads(dry.stdout.split("== Accelerate settings ==\n", 1)[1].split("\n== ", 1)[0])["fsdp2"]
    assert settings["wrap"] == "each BertLayer, then the root"
    (line,) = [x for x in fsdp2.stdout.splitlines() if x.startswith("mplaunch: fsdp2: ")]
    block = re.fullmatch(r"each (\w+), then the root", settings["wrap"])
    assert block is not None
    policy = ", ".join(f"{k}={settings[k]}" for k in ("reshard_after_forward", "param_dtype", "reduce_dtype"))
    layers = fsdp2.plan.shape.num_layers
    assert line == (
        f"mplaunch: fsdp2: fully_shard on {layers} x {block[1]} + root "
        f"({policy}, offload_params={settings['offload_params']})"
    )
    assert "FSDP2 fully_shard, reshard after forward (zero.stage 3)" in dry.stdout


def test_a_resume_through_the_dcp_checkpoint_is_bitwise(workdir: Path, fsdp2: Run) -> None:
    split = train(workdir, "split", FSDP2, args=("train.max_steps=3",))
    assert sorted(p.name for p in (split.checkpoint(3) / "dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    resumed = mplaunch(str(split.recipe))
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from step 3" in resumed.stdout
    assert losses(split.run_dir) == losses(fsdp2.run_dir)
    a, b = (
        flatten(dcp_state(split.checkpoint(STEPS) / "dcp")),
        flatten(dcp_state(fsdp2.checkpoint(STEPS) / "dcp")),
    )
    assert a.keys() == b.keys()
    assert sum(isinstance(v, torch.Tensor) for v in a.values()) > 40
    differ = [
        k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])
    ]
    assert differ == []
    extra = "mplaunch_accelerate.json"
    assert (split.checkpoint(STEPS) / extra).read_text() == (fsdp2.checkpoint(STEPS) / extra).read_text()


def test_a_two_rank_checkpoint_resumes_on_one_rank(workdir: Path, fsdp2: Run) -> None:
    moved = train(workdir, "moved", FSDP2, args=("train.max_steps=3",))
    result = mplaunch("--resume", str(moved.run_dir), "launch.nproc_per_node=1", f"train.max_steps={STEPS}")
    assert result.returncode == 0, explain(result)
    said = "FSDP2 shards resharded by torch.distributed.checkpoint from 2 ranks to 1"
    assert said in result.stdout + result.stderr
    (resized,) = [e for e in records(moved.run_dir, "event") if e["event"] == "resized"]
    assert (resized["from_world"], resized["to_world"]) == (2, 1)
    ours, straight = losses(moved.run_dir), losses(fsdp2.run_dir)
    worst = max(abs(ours[s] - straight[s]) / straight[s] for s in range(4, STEPS + 1))
    assert worst < 1e-5, (ours, straight)


def test_export_of_an_fsdp2_run_gives_the_checkpoints_logits(workdir: Path, fsdp2: Run) -> None:
    from transformers import AutoModelForMaskedLM

    out = workdir / "fsdp2-export"
    result = mplaunch("export", str(fsdp2.run_dir), "--out", str(out))
    assert result.returncode == 0, explain(result)
    plan = fsdp2.plan
    state = dcp_state(fsdp2.checkpoint(STEPS) / "dcp")["model"]  # read by torch's converter, not export
    reference = models.build(plan.recipe.model, plan.shape).lm
    reference.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()}, strict=True)
    exported = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    ids = torch.randint(5, plan.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_parity_attributes_layers_on_fsdp2(workdir: Path) -> None:
    recipe = write_recipe(workdir, "parity", FAST, FSDP2)
    out = workdir / "parity-out"
    result = mplaunch("parity", str(recipe), "precision.dtype=bf16", "--steps", "8", "--out", str(out))
    assert result.returncode == 0, explain(result)
    report = json.loads((out / "parity.json").read_text())
    assert report["verdict"] == "pass"
    assert report["problems"] == []
    layers = report["layers"]
    assert len(layers) == 23  # every layer of the tiny BERT, from the shards' sketches
    assert all(0 < d["rel_diff"] < 0.2 for d in layers)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("bf16", {"precision": {"dtype": "bf16"}}),
        ("fp16", {"precision": {"dtype": "fp16"}}),
        ("lora-recompute", {"model": {"lora": {"rank": 4}}, "train": {"activation_checkpointing": True}}),
    ],
)
def test_fsdp2_trains_in_16_bits_and_with_lora_and_recomputation(
    workdir: Path, name: str, layer: dict[str, Any]
) -> None:
    run = train(workdir, f"few-{name}", FSDP2, {"train": {"max_steps": 4}}, layer)
    got = losses(run.run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(math.isfinite(x) for x in got.values())
    assert "mplaunch: fsdp2: fully_shard on 2 x BertLayer + root (reshard_after_forward=True" in run.stdout
    sharding = [e["message"] for e in records(run.run_dir, "event") if e["event"] == "sharding"]
    assert len(sharding) == 1, sharding
    assert sharding[0].startswith("fsdp2: fully_shard on 2 x BertLayer + root"), sharding
    held = [json.loads((run.run_dir / "memory" / f"rank-{r}.json").read_text())["bytes"] for r in (0, 1)]
    assert abs(held[0]["params"] - held[1]["params"]) / held[0]["params"] < 0.01  # fp32 shards, split evenly
    scales = [r["loss_scale"] for r in records(run.run_dir, "train")]
    assert all((s is not None) is (name == "fp16") for s in scales)
