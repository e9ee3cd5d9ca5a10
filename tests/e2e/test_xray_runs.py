"""The precision x-ray in real trainings on 2 CPU ranks: a broken fp16 run is told, healthy runs are not.

mplaunch refuses DeepSpeed fp16 on CPU, so the broken-scale run here is Accelerate's; where DeepSpeed's
CPU accelerator takes fp16 (this AMD EPYC's oneDNN does) tests/ds_fp16_cpu.py runs it past the refusal,
and tests/e2e/test_gpu.py runs it on a GPU. Every ZeRO stage is checked to count each gradient element once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.plan.resolve import Plan
from launcher.worker.model_setup import model_for
from tests.runs import FAST, ROOT, explain, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

XRAY = {"logging": {"precision_every": 5, "every_steps": 5}, "train": {"max_steps": 10}}
BROKEN = {"precision": {"dtype": "fp16", "loss_scale": {"dynamic": False, "initial": 2.0**-16}}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xray")


def train(workdir: Path, name: str, *layers: dict) -> Path:
    result = mplaunch(str(write_recipe(workdir, name, FAST, XRAY, *layers)))
    assert result.returncode == 0, explain(result)
    return workdir / "runs" / name


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in records(run_dir, "event") if e["event"] == name]


def test_a_static_scale_far_too_low_is_reported_as_underflow_naming_layers(workdir: Path) -> None:
    run_dir = train(workdir, "broken", BROKEN, {"backend": "accelerate"})
    (event,) = events(run_dir, "underflow")  # once: the later x-ray finds the same layers
    assert event["step"] == 1  # the first x-ray
    assert event["loss_scale"] == 2.0**-16
    layers = event["layers"]
    assert "lm.bert.encoder.layer.0.attention.self.query" in layers
    assert all(share >= 0.05 for share in layers.values())
    assert "precision.loss_scale.dynamic=true" in event["remedy"]
    assert "precision.dtype=bf16" in event["remedy"]  # a CPU computes bf16
    xrays = records(run_dir, "precision")
    assert [r["step"] for r in xrays] == [1, 5, 10]
    query = xrays[0]["layers"]["lm.bert.encoder.layer.0.attention.self.query"]
    assert query["zero"] == 1.0  # flushed to zero in the fp16 backward


@pytest.mark.parametrize(
    ("backend", "dtype"), [("accelerate", "fp16"), ("accelerate", "bf16"), ("deepspeed", "bf16")]
)
def test_healthy_runs_raise_no_precision_event(workdir: Path, backend: str, dtype: str) -> None:
    run_dir = train(
        workdir, f"healthy-{backend}-{dtype}", {"backend": backend, "precision": {"dtype": dtype}}
    )
    assert events(run_dir, "underflow") == []
    assert events(run_dir, "lost_updates") == []
    xrays = records(run_dir, "precision")
    assert [r["step"] for r in xrays] == [1, 5, 10]
    rows = xrays[-1]["layers"].values()
    assert all(row["lost"] < 0.1 for row in rows)
    if dtype == "fp16":
        assert all(row["underflow"] < 0.05 for row in rows)
        assert all(row["headroom_log2"] > 0 for row in rows)
    else:
        assert all("underflow" not in row for row in rows)  # bf16 has fp32's range: no fp16 columns
        assert sum(row["stale"] for row in rows) > 0  # bf16 rounds some updates away; fp32 masters keep them


def test_a_vanishing_learning_rate_is_reported_as_lost_updates(workdir: Path) -> None:
    run_dir = train(workdir, "tiny-lr", {"precision": {"dtype": "bf16"}, "optimizer": {"lr": 1e-10}})
    (event, *_) = events(run_dir, "lost_updates")
    assert any("LayerNorm" in name for name in event["layers"])
    assert "optimizer.lr" in event["remedy"]


def test_every_zero_stage_counts_each_gradient_element_once_and_sketches_the_same_gradient(
    workdir: Path,
) -> None:
    """Each rank measures its own shard (or slice); gathered, the counts cover the model exactly,
    and the shards' sketches add up to the same step-1 gradient on every stage (fp32: up to rounding)."""
    first = {}
    for stage in (0, 1, 2, 3):
        run_dir = train(workdir, f"stage-{stage}", {"zero": {"stage": stage}, "precision": {"dtype": "fp32"}})
        if stage == 0:
            model, _ = model_for(Plan.from_json((run_dir / "plan.json").read_text()))
            params = sum(p.numel() for p in model.parameters())
        first[stage] = rows = records(run_dir, "precision")[0]["layers"]
        assert sum(row["elements"] for row in rows.values()) == params, stage
        # Position embeddings past seq_len get no gradient: 512 - 32 of 512 rows are zero.
        assert rows["lm.bert.embeddings.position_embeddings"]["zero"] == pytest.approx(480 / 512, abs=1e-3)
        assert all(row["lost"] is not None for row in rows.values())  # every stage exposes its fp32 masters
    for stage in (1, 2, 3):
        for name, row in first[stage].items():
            ref = torch.tensor(first[0][name]["sketch"])
            assert float((torch.tensor(row["sketch"]) - ref).norm() / ref.norm()) < 1e-4, (stage, name)


@pytest.fixture(scope="module")
def deepspeed_fp16(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "from tests.ds_fp16_cpu import deepspeed_takes_fp16_on_cpu as f; print(f())"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    if probe.stdout.strip().splitlines()[-1:] != ["True"]:
        pytest.skip(f"DeepSpeed does not take fp16 on this CPU: {probe.stdout[-200:]}{probe.stderr[-300:]}")


@pytest.mark.parametrize(("stage", "scale"), [(0, 2.0**-16), (3, 2.0**-16), (2, None)])
def test_deepspeed_fp16_x_ray_on_a_cpu_that_takes_it(
    workdir: Path, deepspeed_fp16: None, stage: int, scale: float | None
) -> None:
    """DeepSpeed holds fp16 gradients scaled: a static 2^-16 is named at step 1, the dynamic default is not."""
    name = f"deepspeed-fp16-z{stage}-{'broken' if scale else 'healthy'}"
    loss_scale = {"dynamic": False, "initial": scale} if scale else {}
    recipe = write_recipe(
        workdir, name, FAST, XRAY,
        {"backend": "deepspeed", "zero": {"stage": stage}, "precision": {"dtype": "fp16", "loss_scale": loss_scale}},
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "tests/ds_fp16_cpu.py", str(recipe)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, explain(result)
    run_dir = workdir / "runs" / name
    underflow = events(run_dir, "underflow")
    if scale:
        assert [e["step"] for e in underflow] == [1]
        assert "lm.bert.encoder.layer.0.attention.self.query" in underflow[0]["layers"]
    else:
        assert underflow == []
        rows = records(run_dir, "precision")[-1]["layers"].values()
        assert all(row["underflow"] < 0.05 for row in rows)
        assert 0 < min(row["headroom_log2"] for row in rows) < 16  # the scaled gradients, not divided twice
