"""The GPU proof script, rehearsed on a CPU with a tiny BERT and a few steps.

bench/gpu_proof.sh is meant to run once on a lent GPU; this rehearsal checks
its plumbing where there is none: every step leaves a JSON file with a real
status, a step kept past its cap is recorded as timed out and the steps after
it still run, and the console log and summary are written as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["install", "env", "nccl", "gpu_tests", "b_deepspeed", "b_accelerate", "c_memory", "d_bf16", "d_fp16"]


@pytest.mark.slow
def test_rehearsal_records_every_step_and_survives_a_timeout(tmp_path: Path) -> None:
    out = tmp_path / "proof"
    # Two cores: run the cheapest form of each step. b_accelerate and d_bf16 (two full runs) are left
    # out; c_memory gets 3 s for a training run that needs far more, to be cut at its cap.
    cmd = [
        "bash",
        str(ROOT / "bench" / "gpu_proof.sh"),
        str(out),
        "--device",
        "cpu",
        "--tiny",
        "--dtypes",
        "fp16,fp32",
        "--micros",
        "4",
        "--skip",
        "b_accelerate,d_bf16",
        "--cap",
        "c_memory=3",
        "--cap",
        "nccl=60",
        "--cap",
        "b_deepspeed=120",
        "--results",
        str(tmp_path / "results"),
    ]
    env = {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["device"]["kind"] == "cpu"
    assert summary["device"]["name"].startswith("cpu (")
    assert [s["name"] for s in summary["steps"]] == STEPS
    status = {s["name"]: s["status"] for s in summary["steps"]}
    steps = {name: json.loads((out / "steps" / f"{name}.json").read_text()) for name in STEPS}
    assert {name: s["status"] for name, s in steps.items()} == status

    # Already installed here: nothing to install, and said so.
    assert status["install"] == "skipped"
    assert "already importable" in steps["install"]["reason"]
    assert status["env"] == "ok"
    assert steps["env"]["numbers"]["torch"]
    # gloo across two processes stands in for NCCL across the GPUs.
    assert status["nccl"] == "ok", steps["nccl"]
    nccl = steps["nccl"]["numbers"]
    assert (nccl["backend"], nccl["world_size"], nccl["all_reduce_correct"]) == ("gloo", 2, True)
    # No GPU: every GPU test is skipped, and the proof says so rather than "ok".
    assert status["gpu_tests"] == "skipped"
    assert "GPU tests skipped" in steps["gpu_tests"]["reason"]
    assert steps["gpu_tests"]["numbers"]["counts"].get("passed", 0) == 0
    # DeepSpeed refuses fp16 on a CPU: that row is a skip with DeepSpeed's reason; fp32 measured.
    assert status["b_deepspeed"] == "ok", steps["b_deepspeed"]
    rows = {r["config"]: r for r in steps["b_deepspeed"]["numbers"]["rows"]}
    assert rows["tiny-32-fp16-deepspeed"]["status"] == "skipped"
    assert "not supported by DeepSpeed on CPU" in rows["tiny-32-fp16-deepspeed"]["reason"]
    assert rows["tiny-32-fp32-deepspeed"]["samples_per_s"] > 0
    assert (out / "data" / "b_deepspeed.json").is_file()
    assert status["b_accelerate"] == status["d_bf16"] == "skipped"
    assert "--skip" in steps["d_bf16"]["reason"]
    # Cut at its cap, recorded as such ...
    assert status["c_memory"] == "timed_out"
    assert steps["c_memory"]["rc"] in (124, 137)
    assert steps["c_memory"]["wall_s"] < 3 + 3 + 5  # the cap, the kill grace, slack
    assert not _tagged(steps["c_memory"]["tag"]), "the timed-out step left processes running"
    # ... and the step after it still ran: mplaunch parity itself refused fp16 on DeepSpeed on CPU.
    assert status["d_fp16"] == "skipped"
    assert steps["d_fp16"]["rc"] == 2
    assert "not supported by DeepSpeed on CPU" in steps["d_fp16"]["reason"]
    assert steps["d_fp16"]["wall_s"] > 0

    console = (out / "console.log").read_text()
    for name in STEPS:
        assert f"gpu-proof: {name}: {status[name]}" in console
    assert "python        " in console  # a step's own output reaches the console log
    for name in ("env", "nccl", "gpu_tests", "b_deepspeed", "c_memory", "d_fp16"):
        assert (out / "logs" / f"{name}.log").is_file()
    copy = json.loads((tmp_path / "results" / f"gpu-proof-{summary['device']['slug']}.json").read_text())
    assert copy["statuses"] == status


def _tagged(tag: str) -> list[int]:
    """Live processes that carry the step's GPU_PROOF_TAG (mplaunch's torchrun runs in its own session)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"GPU_PROOF_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_plan_table_parses(tmp_path: Path) -> None:
    """The memory step reads `mplaunch plan`'s table; keep the two in step (no training here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
        import gpu_proof
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = argparse.Namespace(steps=4, zero=2, device="cpu", log_every=2)
    recipe = gpu.recipe(tmp_path, "large", 128, "bf16", "deepspeed", gpu_proof._suite_args(args, 16))
    plan = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", str(recipe), "--gpu-memory", "80GB"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    column = gpu_proof.parse_plan(plan.stdout)
    assert column["stage"] == 2
    assert column["total"] > column["activations"] > 0
    assert column["CUDA context"] > 0
