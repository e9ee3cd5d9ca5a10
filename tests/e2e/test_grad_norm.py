"""The gradient norm is recorded on every backend and ZeRO stage (ZeRO 0 fp32 used to record null)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.runs import FAST, explain, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("backend", "stage", "dtype"),
    [("deepspeed", 0, "fp32"), ("deepspeed", 0, "bf16"), ("deepspeed", 1, "fp32"), ("deepspeed", 3, "fp32"),
     ("accelerate", 0, "fp32")],
    ids=str,
)  # fmt: skip
def test_every_train_record_has_a_finite_grad_norm(
    tmp_path: Path, backend: str, stage: int, dtype: str
) -> None:
    layer = {
        "backend": backend,
        "zero": {"stage": stage},
        "precision": {"dtype": dtype},
        "train": {"max_steps": 2, "global_batch_size": 8},
        "launch": {"nproc_per_node": 1},
    }
    result = mplaunch(str(write_recipe(tmp_path, "norm", FAST, layer)))
    assert result.returncode == 0, explain(result)
    norms = [r["grad_norm"] for r in records(tmp_path / "runs" / "norm", "train")]
    assert len(norms) == 2
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms), norms


def test_zero_0_reports_the_same_norm_as_zero_1(tmp_path: Path) -> None:
    """The norm mplaunch takes itself at ZeRO 0 is the one DeepSpeed's ZeRO optimizer reports."""
    norms = {}
    for stage in (0, 1):
        layer = {
            "zero": {"stage": stage},
            "precision": {"dtype": "fp32"},
            "train": {"max_steps": 2, "global_batch_size": 8},
            "launch": {"nproc_per_node": 1},
        }
        result = mplaunch(str(write_recipe(tmp_path, f"z{stage}", FAST, layer)))
        assert result.returncode == 0, explain(result)
        norms[stage] = [r["grad_norm"] for r in records(tmp_path / "runs" / f"z{stage}", "train")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
