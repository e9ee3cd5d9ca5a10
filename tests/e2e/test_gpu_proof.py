"""The GPU proof script, rehearsed on a CPU with a tiny BERT and a few steps.

bench/gpu_proof.sh is meant to run once on a lent GPU; this rehearsal checks
its plumbing where there is none: every step leaves a JSON file with a real
status, a step kept past its cap is recorded as timed out and the steps after
it still run, and the console log and summary are written as it goes. The
resize step runs for real on 2 CPU ranks -> 1, as it would on 2 GPUs -> 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "install",
    "env",
    "nccl",
    "gpu_tests",
    "b_deepspeed",
    "b_accelerate",
    "b_fp8",
    "c_memory",
    "d_bf16",
    "d_fp8",
    "d_fp16",
    "e_resize",
]
RESIZED = {"fsdp2_zero3": "torch.distributed.checkpoint", "deepspeed_zero2": "universal checkpoint"}


def _bench_module(name: str) -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.mark.slow
def test_rehearsal_records_every_step_and_survives_a_timeout(tmp_path: Path) -> None:
    out = tmp_path / "proof"
    # Two cores: run the cheapest form of each step. b_accelerate and d_bf16 (two full runs) are left
    # out (b_fp8 and d_fp8 run: fp8 is emulated here, and its proof steps must work before a GPU sees
    # them); c_memory gets 3 s for a training run that needs far more, to be cut at its cap. e_resize runs
    # whole (six mplaunch runs: 96-98 s on two busy cores), with a cap and a budget a CPU needs.
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
        "--cap",
        "e_resize=300",
        "--cap",
        "b_fp8=120",
        "--cap",
        "d_fp8=180",
        "--budget",
        "1200",
        "--results",
        str(tmp_path / "results"),
    ]
    env = {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
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
    # fp8 (emulated on a CPU) against bf16 on FSDP2: both rows measured, fp8's ratio over bf16 given.
    assert status["b_fp8"] == "ok", steps["b_fp8"]
    rows = {r["config"]: r for r in steps["b_fp8"]["numbers"]["rows"]}
    assert rows["tiny-32-bf16-accelerate"]["samples_per_s"] > 0
    assert rows["tiny-32-fp8-accelerate"]["samples_per_s"] > 0
    assert rows["tiny-32-fp8-accelerate"]["speedup_vs_bf16"] > 0
    # parity of fp8 against its bf16 reference ran to the end and wrote its verdict.
    assert status["d_fp8"] == "ok", steps["d_fp8"]
    assert json.loads((out / "data" / "d_fp8.json").read_text())["reference"] == "bf16"
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
    # 2 ranks stopped at step 4, resumed on 1 to step 8: fp32 losses as if it never stopped, and said how.
    assert status["e_resize"] == "ok", steps["e_resize"]
    resize = steps["e_resize"]["numbers"]
    assert (resize["dtype"], resize["from_world"], resize["to_world"]) == ("fp32", 2, 1)
    assert resize == json.loads((out / "data" / "e_resize.json").read_text())
    assert set(resize["backends"]) == set(RESIZED)
    for name, how in RESIZED.items():
        entry = resize["backends"][name]
        assert entry["compared_steps"] == [5, 6, 7, 8]
        assert 0 <= entry["max_rel_diff"] < 1e-4, entry["losses"]
        event = entry["resized"]
        assert (event["step"], event["from_world"], event["to_world"]) == (4, 2, 1)
        assert event["seconds"] > 0
        assert how in event["how"]
        assert "error" not in entry

    console = (out / "console.log").read_text()
    for name in STEPS:
        assert f"gpu-proof: {name}: {status[name]}" in console
    assert "python        " in console  # a step's own output reaches the console log
    assert "resumed step 4 written by 2 ranks on 1 rank" in (out / "logs" / "e_resize.log").read_text()
    for name in ("env", "nccl", "gpu_tests", "b_deepspeed", "c_memory", "d_fp16", "e_resize"):
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


def test_resize_without_two_gpus_is_a_skip_with_its_reason(tmp_path: Path) -> None:
    """On a machine with fewer than 2 GPUs (this one has none) the resize step records a skip, not a pass."""
    out = tmp_path / "proof"
    data = out / "data" / "e_resize.json"
    proof = [sys.executable, str(ROOT / "bench" / "gpu_proof.py")]
    resize = [*proof, "resize", "--device", "cuda", "--scratch", str(tmp_path / "e"), "--out", str(data)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(resize, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "e").exists()  # nothing was trained
    record = [*proof, "record", "--out", str(out), "--step", "e_resize", "--rc", "0", "--cap", "75"]
    subprocess.run(record, cwd=ROOT, check=True, capture_output=True, timeout=60)
    step = json.loads((out / "steps" / "e_resize.json").read_text())
    assert (step["status"], step["reason"]) == ("skipped", "needs 2 GPUs; this machine has 0")


def test_resize_losses_past_the_tolerance_fail_the_step() -> None:
    gpu_proof = _bench_module("gpu_proof")
    entry = {"max_rel_diff": 3e-3, "within_tolerance": False}
    data = {"tolerance": 1e-4, "backends": {"fsdp2_zero3": entry, "deepspeed_zero2": {"error": "boom"}}}
    _, status, reason = gpu_proof._resize_numbers(data)
    assert status == "failed"
    assert reason == (
        "fsdp2_zero3: losses after the resume differ by 3.00e-03 relative (tolerance 0.0001); "
        "deepspeed_zero2: boom"
    )
    data["backends"] = {"fsdp2_zero3": {"max_rel_diff": 2e-7, "within_tolerance": True}}
    assert gpu_proof._resize_numbers(data)[1:] == (None, None)


def test_plan_table_parses(tmp_path: Path) -> None:
    """The memory step reads `mplaunch plan`'s table; keep the two in step (no training here)."""
    gpu = _bench_module("gpu")
    gpu_proof = _bench_module("gpu_proof")
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
