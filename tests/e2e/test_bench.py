"""The benchmarks run end to end (numbers are not asserted: they depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_suite_runs_on_cpu_with_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu.py",
            "--device",
            "cpu",
            "--sizes",
            "tiny",
            "--seqs",
            "32",
            "--dtypes",
            "fp32,bf16,fp16",
            "--backends",
            "deepspeed",
            "--steps",
            "4",
            "--log-every",
            "2",
            "--warmup-records",
            "0",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"tiny-32-fp32-deepspeed", "tiny-32-bf16-deepspeed", "tiny-32-fp16-deepspeed"}
    for name in ("tiny-32-fp32-deepspeed", "tiny-32-bf16-deepspeed"):
        assert rows[name]["samples_per_s"] > 0
        assert rows[name]["tflops"] > 0
        assert rows[name]["mfu"] is None  # no peak table for a CPU
    assert rows["tiny-32-bf16-deepspeed"]["speedup_vs_fp32"] == pytest.approx(
        rows["tiny-32-bf16-deepspeed"]["samples_per_s"] / rows["tiny-32-fp32-deepspeed"]["samples_per_s"]
    )
    # DeepSpeed refuses fp16 on a CPU: the suite records why and goes on.
    assert "fp16 is not supported by DeepSpeed on CPU" in rows["tiny-32-fp16-deepspeed"]["error"]
    assert "tiny-32-bf16-deepspeed" in result.stdout
    assert "vs fp32" in result.stdout
    assert report["info"]["device"] == "cpu"


def test_token_rss_prepares_both_corpora_and_measures_each_rank(tmp_path: Path) -> None:
    out = tmp_path / "token-rss.json"
    result = subprocess.run(
        [sys.executable, "bench/token_rss.py", "--docs", "200", "--scale", "3", "--batches", "4", "--repeats", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["prepared"]) == {"1x", "3x"}
    assert report["prepared"]["3x"]["tokens"] > 2 * report["prepared"]["1x"]["tokens"]
    assert report["prepared"]["1x"]["prepare_line"].startswith("prepared ")
    assert report["prepared"]["1x"]["cached_line"].startswith("cached ")
    assert set(report["median"]) == {"cache 1x", "cache 3x", "memory 1x", "memory 3x"}
    for run in report["median"].values():
        assert run["peak_kb"] >= run["baseline_kb"] > 0
        assert run["micro_batches"] >= 4
    assert report["median"]["cache 3x"]["rows"] == report["median"]["memory 3x"]["rows"]
    assert "token cache 3x/1x: peak RSS" in result.stdout
    assert out.with_suffix(".txt").read_text().strip() == result.stdout.strip()


def test_xray_cost_times_the_three_cadences(tmp_path: Path) -> None:
    from launcher.recipe.schema import Logging

    out = tmp_path / "xray-cost.json"
    result = subprocess.run(
        [sys.executable, "bench/xray_cost.py", "--steps", "8", "--log-every", "2", "--repeats", "1",
         "--backends", "accelerate:fp16", "--warmup-steps", "0", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    backend = report["results"]["accelerate:fp16"]
    runs = {way: r for way, (r,) in backend["runs"].items()}
    assert {w: r["precision_every"] for w, r in runs.items()} == {
        "off": 0,
        "every": 1,
        "default": Logging.model_fields["precision_every"].default,  # the key left out of the recipe
    }
    # Steps 2 to 8 are timed (the first interval, step 1 logged alone, is warm-up): an x-ray in each
    # of them only at cadence 1.
    assert {w: (r["measured_steps"], r["measured_xrays"]) for w, r in runs.items()} == {
        "off": (7, 0),
        "every": (7, 7),
        "default": (7, 0),
    }
    summary, off = backend["summary"], runs["off"]["step_s"]
    assert summary["xray_step_ratio"]["median"] == pytest.approx(runs["every"]["step_s"] / off)
    assert summary["amortised_ratio"]["median"] == pytest.approx(runs["default"]["step_s"] / off)
    assert all(r["other_cpu_share"] is None or 0 <= r["other_cpu_share"] <= 1 for r in runs.values())
    assert "per x-ray step" in result.stdout
    assert out.with_suffix(".txt").read_text().strip() in result.stdout


def test_resize_times_the_resharding_and_compares_fsdp2_with_zero3(tmp_path: Path) -> None:
    out = tmp_path / "resize.json"
    result = subprocess.run(
        [sys.executable, "bench/resize.py", "--shapes", "tiny", "--configs", "deepspeed-z2,fsdp2", "--steps", "4",
         "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["resharding"]}
    assert set(rows) == {"deepspeed-z2", "fsdp2"}
    assert rows["deepspeed-z2"]["to_1_rank_how"].startswith("converted to DeepSpeed's universal checkpoint")
    assert rows["deepspeed-z2"]["back_to_2_how"].startswith("converted to DeepSpeed's universal checkpoint")
    assert rows["fsdp2"]["to_1_rank_how"].startswith("FSDP2 shards resharded by torch.distributed.checkpoint")
    assert all(r["checkpoint_bytes"] > 0 and r["to_1_rank_s"] > 0 for r in rows.values())
    timing = report["step_time"]
    assert timing["ratio"] == timing["fsdp2_step_s"] / timing["zero3_step_s"] > 0
    assert "FSDP2 / ZeRO-3 = " in result.stdout
    assert out.with_suffix(".txt").read_text().strip() == result.stdout.strip()
