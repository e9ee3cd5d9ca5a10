"""What a change of world size costs, and FSDP2 against DeepSpeed ZeRO-3, on the CPU.

Two measurements, each through `mplaunch` as a user runs it (2 ranks over gloo):

- **resharding**: for each sharded configuration (DeepSpeed ZeRO 1-3, FSDP2 = Accelerate with
  zero.stage 3) and each model shape (the tiny BERT and BERT-base), a 2-rank run saves a
  checkpoint at step 2, then `mplaunch --resume RUN launch.nproc_per_node=1` continues it on
  one rank. The workers' `resized` event says how long loading the checkpoint at the new size
  took (DeepSpeed: converting it to a universal checkpoint and loading that; FSDP2: torch's
  distributed checkpoint resharding as it loads); a second resume back on 2 ranks shows the
  cost once the conversion exists. Printed against the checkpoint's size (s and s/GB).
- **step time**: the same recipe on FSDP2 and on DeepSpeed ZeRO-3, alternating, several times;
  the median step time of the steps after the first two, and the ratio FSDP2 / ZeRO-3.

Not a test: the numbers depend on the machine. tests/e2e/test_bench.py runs it small.

    python bench/resize.py [--shapes tiny,base] [--steps 12] [--repeats 3] [--out bench/results/resize-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.rundir import checkpoint  # noqa: E402
from launcher.rundir.layout import RunDir  # noqa: E402

SHARDED = {
    "deepspeed-z1": ("deepspeed", 1),
    "deepspeed-z2": ("deepspeed", 2),
    "deepspeed-z3": ("deepspeed", 3),
    "fsdp2": ("accelerate", 3),
}
BASE = {
    "extends": str(ROOT / "recipes" / "bert_tiny.yaml"),
    "data": {"seq_len": 32},
    "model": {"dropout": 0.0},
    "precision": {"dtype": "fp32"},
    "scheduler": {"name": "constant"},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "eval_every": 0},
    "logging": {"every_steps": 1, "tensorboard": False, "progress": False, "precision_every": 0},
    "launch": {"device": "cpu", "nproc_per_node": 2},
}


def mplaunch(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    if done.returncode != 0:
        raise SystemExit(f"mplaunch {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def recipe(directory: Path, name: str, config: str, shape: str, steps: int, every: int = 0) -> Path:
    backend, stage = SHARDED[config]
    body = json.loads(json.dumps(BASE))
    body.update(name=name, backend=backend, zero={"stage": stage})
    body["model"]["size"] = shape
    body["train"]["max_steps"] = steps
    body["checkpoint"] = {"every_steps": every, "keep": 2}
    body["logging"]["dir"] = str(directory / "runs")
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def events(run: Path, name: str) -> list[dict[str, Any]]:
    lines = RunDir.of(run).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "event" and r.get("event") == name]


def step_times(run: Path) -> list[float]:
    lines = RunDir.of(run).metrics.read_text().splitlines()
    return [r["step_time_s"] for r in map(json.loads, lines) if r.get("kind") == "train" and r["step"] > 2]


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def resharding(work: Path, config: str, shape: str) -> dict[str, Any]:
    name = f"{config}-{shape}"
    mplaunch(str(recipe(work, name, config, shape, steps=2, every=2)))
    run = work / "runs" / name
    size = size_of(checkpoint.complete(RunDir.of(run).checkpoints)[-1])
    mplaunch("--resume", str(run), "train.max_steps=3", "launch.nproc_per_node=1")
    mplaunch("--resume", str(run), "train.max_steps=4", "launch.nproc_per_node=2")
    first, second = events(run, "resized")[:2]
    return {
        "config": config,
        "shape": shape,
        "checkpoint_bytes": size,
        "to_1_rank_s": first["seconds"],
        "to_1_rank_how": first["how"],
        "back_to_2_s": second["seconds"],
        "back_to_2_how": second["how"],
    }


def step_time(work: Path, shape: str, steps: int, repeats: int) -> dict[str, Any]:
    medians: dict[str, list[float]] = {"fsdp2": [], "deepspeed-z3": []}
    for i in range(repeats):
        for config in medians:  # alternating, so a slow phase of the machine hits both
            name = f"time-{config}-{shape}-{i}"
            mplaunch(str(recipe(work, name, config, shape, steps=steps)))
            medians[config].append(statistics.median(step_times(work / "runs" / name)))
    fsdp2, zero3 = statistics.median(medians["fsdp2"]), statistics.median(medians["deepspeed-z3"])
    return {
        "shape": shape,
        "fsdp2_step_s": fsdp2,
        "zero3_step_s": zero3,
        "ratio": fsdp2 / zero3,
        "runs": medians,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,base")
    parser.add_argument("--configs", default=",".join(SHARDED))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-shape", default="tiny")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mplaunch-resize-") as tmp:
        work = Path(tmp)
        rows = [resharding(work, c, s) for s in args.shapes.split(",") for c in args.configs.split(",")]
        timing = step_time(work, args.timing_shape, args.steps, args.repeats)
    lines = [
        f"resume at another world size (2 ranks -> 1 -> 2), {platform.processor() or platform.machine()}",
        f"{'config':<14}{'shape':<7}{'checkpoint MB':>14}{'2->1 s':>9}{'s/GB':>8}{'1->2 s':>9}  how (2->1)",
    ]
    for r in rows:
        gb = r["checkpoint_bytes"] / 1e9
        lines.append(
            f"{r['config']:<14}{r['shape']:<7}{r['checkpoint_bytes'] / 1e6:>14.1f}{r['to_1_rank_s']:>9.2f}"
            f"{r['to_1_rank_s'] / gb:>8.2f}{r['back_to_2_s']:>9.2f}  {r['to_1_rank_how']}"
        )
    lines.append(
        f"step time, {timing['shape']} BERT, 2 ranks, median of {args.repeats} runs: FSDP2 "
        f"{timing['fsdp2_step_s'] * 1e3:.1f} ms, DeepSpeed ZeRO-3 {timing['zero3_step_s'] * 1e3:.1f} ms, "
        f"FSDP2 / ZeRO-3 = {timing['ratio']:.2f}"
    )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"resharding": rows, "step_time": timing}, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
