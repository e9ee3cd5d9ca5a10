"""What fp8 costs or saves: a training step with precision.dtype fp8 against the same step in bf16.

The training: recipes/gpt2_tiny.yaml (tiny GPT-2 causal LM, sequence 64, micro-batch 8, global batch
32, 2 CPU ranks over gloo, or a rank per GPU over NCCL), without evaluation or checkpoints, on each
BACKEND:STAGE asked for (default: Accelerate FSDP2 at zero.stage 2 and DeepSpeed ZeRO-2). Two ways
run side by side through mplaunch, as a user runs it, their order swapped in every repeat:

    bf16     precision.dtype=bf16
    fp8      precision.dtype=fp8: the plan's linear layers in torchao float8 (tensorwise), the rest
             bf16; on a CPU the fp8 matrix products are emulated (real fp8 casts, fp32 products)

Measured per run: the mean step time after the warm-up intervals, from the `step_time_s` of
RUN_DIR/metrics.jsonl's `train` records. Printed: the median step times over the repeats, and
fp8 / bf16 paired within each repeat, median [min-max]. On a CPU this is the price of emulation,
not a speed-up: fp8 pays on GPUs with fp8 tensor cores (compute capability 8.9+), on large layers.

Not a test: timings depend on the machine, so run it on an idle one. Each run records the share of
the machine's CPUs that other processes used meanwhile (as bench/xray_cost.py does); the summary
says when a kept run passed 5 %.

    python bench/fp8_cost.py [--repeats 3] [--steps 60] [--paths accelerate:2 deepspeed:2]
                             [--log-every 10] [--warmup-intervals 1] [--device cpu|cuda] [--out FILE]

Writes bench/results/fp8-cost-cpu.json (--device cuda: fp8-cost-GPU_NAME.json) and the printed
lines as the .txt beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import overhead  # bench/, this script's own folder: the device setup and its DEVICE
from gpu_proof import device_name
from xray_cost import NOISY, timed_mplaunch, write_report

from launcher.rundir.layout import RunDir

ROOT = overhead.ROOT
WAYS = ("bf16", "fp8")


def _recipe(tmp: Path, path: str, way: str, steps: int, log_every: int) -> tuple[Path, Path]:
    """The recipe of one run and its run directory."""
    import yaml

    backend, stage = path.split(":")
    name = f"fp8cost-{backend}{stage}-{way}"
    body = {
        "extends": str(ROOT / "recipes" / "gpt2_tiny.yaml"),
        "name": name,
        "train": {"max_steps": steps, "eval_every": 0},
        "precision": {"dtype": way},
        "backend": backend,
        "zero": {"stage": int(stage)},
        "launch": dict(overhead.DEVICE),
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "logging": {"dir": str(tmp / "runs"), "every_steps": log_every, "tensorboard": False,
                    "progress": False, "precision_every": 0},
    }  # fmt: skip
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(body))
    return recipe, tmp / "runs" / name


def run(tmp: Path, path: str, way: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mplaunch run: its mean step time after the warm-up intervals, and its intervals."""
    recipe, run_dir = _recipe(tmp, path, way, args.steps, args.log_every)
    shutil.rmtree(run_dir, ignore_errors=True)
    done, job_s, other = timed_mplaunch(recipe)
    converted = [line for line in done.stdout.splitlines() if "mplaunch: fp8:" in line]
    if (way == "fp8") != bool(converted):  # the configuration did not take effect as assumed
        raise SystemExit(f"{run_dir}: precision.dtype {way} but fp8 lines {converted}")
    records = [json.loads(line) for line in RunDir.of(run_dir).metrics.read_text().splitlines()]
    intervals, last = [], 0
    for r in records:
        if r["kind"] == "train":
            intervals.append({"step": r["step"], "steps": r["step"] - last, "step_time_s": r["step_time_s"]})
            last = r["step"]
    measured = intervals[args.warmup_intervals :]
    if not measured:
        raise SystemExit(f"{run_dir}: {len(intervals)} intervals, none left after the warm-up")
    n = sum(i["steps"] for i in measured)
    return {
        "job_s": job_s,
        "step_s": sum(i["step_time_s"] * i["steps"] for i in measured) / n,
        "measured_steps": n,
        "fp8_line": converted[0].removeprefix("mplaunch: ") if converted else None,
        "other_cpu_share": other,
        "intervals": intervals,
    }


def measure(tmp: Path, path: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """One path's runs, bf16 and fp8 side by side, and their summary."""
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    for i in range(args.repeats):
        order = WAYS if i % 2 == 0 else WAYS[::-1]  # each way goes first in turn
        done = {way: run(tmp, path, way, args) for way in order}
        say(
            f"{path} repeat {i + 1}: "
            + ", ".join(
                f"{w} {done[w]['step_s'] * 1e3:.1f} ms/step (job {done[w]['job_s']:.1f} s)" for w in WAYS
            )
        )
        for way, r in done.items():
            runs[way].append(r)
    ratios = [f["step_s"] / b["step_s"] for f, b in zip(runs["fp8"], runs["bf16"], strict=True)]
    summary = {
        "median_step_s": {w: statistics.median(r["step_s"] for r in runs[w]) for w in WAYS},
        "fp8_over_bf16": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "fp8_line": runs["fp8"][0]["fp8_line"],
        "other_cpu_share_max": max((r["other_cpu_share"] or 0.0 for w in WAYS for r in runs[w]), default=0.0),
    }
    return {"summary": summary, "runs": runs}


def lines_for(path: str, s: dict[str, Any]) -> list[str]:
    med, ratio = s["median_step_s"], s["fp8_over_bf16"]
    pad = " " * (len(path) + 2)
    lines = [
        f"{path}  step time: bf16 {med['bf16'] * 1e3:.1f} ms, fp8 {med['fp8'] * 1e3:.1f} ms; "
        f"fp8/bf16 {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]",
        f"{pad}{s['fp8_line']}",
    ]
    if s["other_cpu_share_max"] > NOISY:
        lines.append(f"{pad}disturbed: other processes used up to {s['other_cpu_share_max']:.0%} of the CPUs")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--paths", nargs="+", default=["accelerate:2", "deepspeed:2"], help="BACKEND:ZERO_STAGE")
    p.add_argument("--log-every", type=int, default=10, help="logging.every_steps: the intervals timed")
    p.add_argument("--warmup-intervals", type=int, default=1, help="intervals left out of each run's start")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one rank per visible GPU")
    p.add_argument("--out", type=Path, help="default: bench/results/fp8-cost-cpu.json, or -GPU_NAME.json")
    args = p.parse_args()
    described = overhead._use_device(args.device)
    info = device_name(args.device)
    out = args.out or ROOT / "bench" / "results" / f"fp8-cost-{info['slug']}.json"
    printed: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        printed.append(line)

    say(f"{described}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report: dict[str, Any] = {
        "device": described,
        "device_info": info,
        "recipe": "recipes/gpt2_tiny.yaml",
        "steps": args.steps,
        "log_every": args.log_every,
        "warmup_intervals": args.warmup_intervals,
        "world_size": overhead.DEVICE["nproc_per_node"],
        "repeats": args.repeats,
        "load_before": os.getloadavg(),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for path in args.paths:
            report["results"][path] = measure(Path(d), path, args, say)
    say(f"\nmedians over {args.repeats} repeats; fp8/bf16 paired within a repeat, median [min-max]:")
    summary = [line for path, r in report["results"].items() for line in lines_for(path, r["summary"])]
    write_report(report, summary, out, printed, say)


if __name__ == "__main__":
    main()
