"""The benchmarks run end to end (numbers are not asserted: they depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
