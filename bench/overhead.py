"""What mplaunch costs over a hand-written script: time to first step and steady-state step time.

Runs the same training (tiny BERT, 2 CPU ranks, gloo, DeepSpeed ZeRO 2, fp32,
the same DeepSpeed config, the same number of steps) through `mplaunch` and
through bench/plain_train.py started by torchrun, alternating, several
times; prints the medians and their ratios (mplaunch / plain). Target: both
ratios within 1.05. Not a test: timings depend on the machine.

    python bench/overhead.py [--repeats 6] [--steps 80] [--out bench/results/overhead-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 10  # steps excluded from the steady state (first-step compilation, allocator warm-up)


def _recipe(tmp: Path, steps: int) -> Path:
    import yaml

    body = {
        "extends": str(ROOT / "recipes" / "bert_tiny.yaml"),
        "name": "overhead",
        "train": {"max_steps": steps, "eval_every": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "logging": {"dir": str(tmp / "runs"), "every_steps": WARMUP, "tensorboard": False, "progress": False},
    }
    path = tmp / "overhead.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run_mplaunch(tmp: Path, steps: int) -> tuple[float, float]:
    recipe = _recipe(tmp, steps)
    run_dir = tmp / "runs" / "overhead"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher", str(recipe)], check=True, cwd=ROOT, capture_output=True)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in train if r["kind"] == "train"}
    # The first record is written at step WARMUP; its per-step time gives the first step's end.
    first = times[WARMUP] - (WARMUP - 1) * (times[2 * WARMUP] - times[WARMUP]) / WARMUP
    steady = (times[steps] - times[WARMUP]) / (steps - WARMUP)
    return first - started, steady


def run_plain(tmp: Path, steps: int) -> tuple[float, float]:
    plan = tmp / "runs" / "overhead" / "plan.json"  # the config mplaunch generated for the same recipe
    out = tmp / "plain.json"
    env_cmd = [
        "env",
        "DS_ACCELERATOR=cpu",
        "OMP_NUM_THREADS=1",
        "PYTHONUNBUFFERED=1",
        "TOKENIZERS_PARALLELISM=false",
    ]
    started = time.time()
    subprocess.run(
        [
            *env_cmd,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=2",
            str(ROOT / "bench" / "plain_train.py"),
            str(plan),
            str(steps),
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    ends = json.loads(out.read_text())["step_end_times"]
    return ends[0] - started, (ends[steps - 1] - ends[WARMUP - 1]) / (steps - WARMUP)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead-cpu.json")
    args = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"mplaunch": [], "plain": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_mplaunch(tmp, args.steps)  # warms the DeepSpeed op cache and writes plan.json for the baseline
        for i in range(args.repeats):
            # Alternate which goes first so neither always runs on a warmer (or busier) machine.
            order = ("mplaunch", "plain") if i % 2 == 0 else ("plain", "mplaunch")
            for which in order:
                runner = run_mplaunch if which == "mplaunch" else run_plain
                results[which].append(runner(tmp, args.steps))
            print(
                f"repeat {i + 1}: mplaunch {results['mplaunch'][-1]}, plain {results['plain'][-1]}",
                flush=True,
            )
    med = {
        k: (statistics.median(v[0] for v in r), statistics.median(v[1] for v in r))
        for k, r in results.items()
    }
    ratio_first = med["mplaunch"][0] / med["plain"][0]
    ratio_step = med["mplaunch"][1] / med["plain"][1]
    print(
        f"time to first step : mplaunch {med['mplaunch'][0]:.2f} s, plain {med['plain'][0]:.2f} s, "
        f"ratio {ratio_first:.3f}"
    )
    print(
        f"steady step time   : mplaunch {1000 * med['mplaunch'][1]:.1f} ms, plain {1000 * med['plain'][1]:.1f} ms, "
        f"ratio {ratio_step:.3f}"
    )
    print(f"target: both ratios <= 1.05: {'met' if max(ratio_first, ratio_step) <= 1.05 else 'NOT met'}")
    import torch

    report = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": results,
        "median_s": med,
        "ratio_time_to_first_step": ratio_first,
        "ratio_steady_step_time": ratio_step,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
