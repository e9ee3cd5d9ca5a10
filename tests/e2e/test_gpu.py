"""The training matrix on a CUDA GPU with NCCL (skipped without one; CI has none).

Same shape as the CPU tests: every configuration trains the tiny BERT and
ends close to an fp32 reference on the same global batches; fp16 runs use
dynamic loss scaling on both backends, and an injected overflow is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runs import FAST, FAST_USER_MODEL, explain, last_loss, mplaunch, records, write_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GPU = {"launch": {"device": "cuda", "nproc_per_node": "auto"}}
TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 3e-2, "fp16": 3e-2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def reference(workdir: Path) -> float:
    recipe = write_recipe(
        workdir,
        "reference",
        FAST,
        GPU,
        {"precision": {"dtype": "fp32", "allow_tf32": False}, "zero": {"stage": 0}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    return last_loss(workdir / "runs" / "reference")


MATRIX = [("deepspeed", stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16", "fp16")] + [
    ("accelerate", stage, dtype) for stage in (0, 2, 3) for dtype in ("fp32", "bf16", "fp16")
]


@pytest.mark.parametrize(("backend", "stage", "dtype"), MATRIX, ids=lambda v: str(v))
def test_gpu_loss_matches_fp32(workdir: Path, reference: float, backend: str, stage: int, dtype: str) -> None:
    name = f"{backend}-z{stage}-{dtype}"
    recipe = write_recipe(
        workdir,
        name,
        FAST,
        GPU,
        {"backend": backend, "zero": {"stage": stage}, "precision": {"dtype": dtype}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    run_dir = workdir / "runs" / name
    loss = last_loss(run_dir)
    assert abs(loss - reference) / reference < TOLERANCE[dtype], (loss, reference)
    train = records(run_dir, "train")
    assert (train[-1]["loss_scale"] is not None) == (dtype == "fp16")
    assert train[-1]["mem_peak_bytes"] > 0


@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
def test_gpu_fp16_overflow_is_skipped_and_scale_backs_off(workdir: Path, backend: str) -> None:
    name = f"overflow-{backend}"
    recipe = write_recipe(
        workdir,
        name,
        FAST_USER_MODEL,
        GPU,
        {
            "backend": backend,
            "precision": {"dtype": "fp16", "loss_scale": {"initial": 2.0**16, "hysteresis": 1}},
            "model": {
                "name": None,
                "target": "spiky_model:build",
                "kwargs": {"vocab_size": 512, "spike_steps": [3], "accum": 2},
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        },
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    train = {r["step"]: r for r in records(workdir / "runs" / name, "train")}
    assert train[3]["skipped_steps"] == 1
    assert train[6]["skipped_steps"] == 1
    assert train[2]["loss_scale"] == 2.0**16
    assert train[3]["loss_scale"] == 2.0**15


@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gpu_fp16_underflow_is_named_by_the_precision_xray(workdir: Path, backend: str, stage: int) -> None:
    """The x-ray on GPU, on DeepSpeed's fp16 too (refused on CPU): a static scale of 2^-16 is told."""
    name = f"underflow-{backend}-z{stage}"
    broken = {"dtype": "fp16", "loss_scale": {"dynamic": False, "initial": 2.0**-16}}
    recipe = write_recipe(
        workdir,
        name,
        FAST,
        GPU,
        {"backend": backend, "zero": {"stage": stage}, "precision": broken},
        {"logging": {"precision_every": 3}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    (event,) = [e for e in records(workdir / "runs" / name, "event") if e["event"] == "underflow"]
    assert event["step"] == 3
    assert "lm.bert.encoder.layer.0.attention.self.query" in event["layers"]
