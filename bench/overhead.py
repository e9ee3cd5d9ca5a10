"""What mplaunch costs over a hand-written script of the same training, on DeepSpeed and on Accelerate.

The training: a BERT masked LM (vocabulary 8192, hidden 256, 4 layers, 4 heads), micro-batch 8,
sequence 128, synthetic ids, 2 CPU ranks over gloo (or a rank per GPU over NCCL), bf16 (fp32 masters), DeepSpeed ZeRO-2 or
Accelerate DDP. Three ways run side by side, alternating their order in every repeat:

    plain     bench/plain_train.py under torchrun: the model's own loss, the same DeepSpeed config
              or Accelerate settings (read from the mplaunch run's plan.json), no logging
    model     mplaunch with train.loss=model: the identical loss, so the ratio to plain is what
              the launcher and its loop cost
    labelled  mplaunch with its default train.loss=labelled: the same loss value, the output head
              run on the masked positions only

Measured per run: whole job (the command's wall time, start to exit), time to first step (step 1's
end; mplaunch's `ready` event), steady step time (from step 10 to the last, from metrics.jsonl's
records and the plain script's step end times). Printed: medians and the min-max of the ratios of
runs paired within a repeat. Targets (mplaunch train.loss=model over plain): steady step time
<= 1/0.98, whole job <= 1.02 at 200 steps, time to first step <= 1.0. Not a test: timings depend
on the machine, so run it on an idle one.

    python bench/overhead.py [--repeats 3] [--steps 20 200] [--backends deepspeed accelerate]
                             [--device cpu|cuda] [--out FILE]

--device cuda runs one rank per visible GPU over NCCL (the same model and batch: small enough that
the host's work per step shows) and writes bench/results/overhead-GPU_NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_proof import device_name  # bench/, this script's own folder

from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 10  # steps left out of the steady state (first-step work, allocator warm-up)
WAYS = ("plain", "model", "labelled")
MODEL = {"name": "bert-mlm", "size": "tiny", "hidden_size": 256, "num_layers": 4, "num_heads": 4,
         "intermediate_size": 1024, "vocab_size": 8192}  # fmt: skip


DEVICE = {"device": "cpu", "nproc_per_node": 2}  # main() sets the device and its ranks


def _recipe(tmp: Path, backend: str, steps: int, loss: str) -> Path:
    import yaml

    body = {
        "name": f"overhead-{backend}-{loss}",
        "model": MODEL,
        "data": {"kind": "synthetic", "num_samples": 4096, "seq_len": 128, "eval_fraction": 0.0},
        "train": {"micro_batch_size": 8, "global_batch_size": 16, "max_steps": steps, "loss": loss},
        "precision": {"dtype": "bf16"},
        "backend": backend,
        "zero": {"stage": 2 if backend == "deepspeed" else 0},
        "launch": dict(DEVICE),
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "logging": {"dir": str(tmp / "runs"), "every_steps": WARMUP, "tensorboard": False, "progress": False},
    }
    path = tmp / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run_mplaunch(tmp: Path, backend: str, steps: int, loss: str) -> dict[str, float]:
    recipe = _recipe(tmp, backend, steps, loss)
    run_dir = tmp / "runs" / f"overhead-{backend}-{loss}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher", str(recipe)], check=True, cwd=ROOT, capture_output=True)
    ended = time.time()
    records = [json.loads(line) for line in RunDir.of(run_dir).metrics.read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if r["kind"] == "train"}
    ready = next(r for r in records if r["kind"] == "event" and r["event"] == "ready")
    return {
        "job_s": ended - started,
        "first_step_s": ready["time"] - started,
        "step_s": (times[steps] - times[WARMUP]) / (steps - WARMUP),
    }


def run_plain(tmp: Path, backend: str, steps: int) -> dict[str, float]:
    plan = RunDir.of(tmp / "runs" / f"overhead-{backend}-model").plan_file  # written by the warm-up run
    out = tmp / "plain.json"
    saved = json.loads(plan.read_text())["plan"]
    env = {**os.environ, **saved["env"]}  # the environment mplaunch gives its workers (threads, accelerator)
    nproc = f"--nproc-per-node={DEVICE['nproc_per_node']}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", nproc,
               str(ROOT / "bench" / "plain_train.py"), str(plan), str(steps), str(out)]  # fmt: skip
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, env=env)
    ended = time.time()
    ends = json.loads(out.read_text())["step_end_times"]
    return {
        "job_s": ended - started,
        "first_step_s": ends[0] - started,
        "step_s": (ends[steps - 1] - ends[WARMUP - 1]) / (steps - WARMUP),
    }


def _one(tmp: Path, backend: str, steps: int, way: str) -> dict[str, float]:
    return run_plain(tmp, backend, steps) if way == "plain" else run_mplaunch(tmp, backend, steps, way)


def _ratios(runs: dict[str, list[dict[str, float]]], way: str, key: str) -> dict[str, float]:
    paired = [m[key] / p[key] for m, p in zip(runs[way], runs["plain"], strict=True)]
    return {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 200])
    p.add_argument("--backends", nargs="+", default=["deepspeed", "accelerate"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one rank per visible GPU")
    p.add_argument("--out", type=Path, help="default: bench/results/overhead-cpu.json, or -GPU_NAME.json")
    args = p.parse_args()
    described = _use_device(args.device)
    # Named as the GPU proof names its results (bench/gpu_proof.py: NVIDIA_H200, or cpu).
    out = args.out or ROOT / "bench" / "results" / f"overhead-{device_name(args.device)['slug']}.json"
    report: dict[str, Any] = {
        "device": described,
        "model": MODEL,
        "micro_batch_size": 8,
        "seq_len": 128,
        "world_size": DEVICE["nproc_per_node"],
        "dtype": "bf16",
        "repeats": args.repeats,
        "results": {},
    }
    lines = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for backend in args.backends:
            run_mplaunch(tmp, backend, max(args.steps), "model")  # warms the op cache, writes the plan
            for steps in args.steps:
                runs: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
                for i in range(args.repeats):
                    order = WAYS[i % len(WAYS) :] + WAYS[: i % len(WAYS)]  # each way goes first in turn
                    for way in order:
                        runs[way].append(_one(tmp, backend, steps, way))
                    print(f"{backend} {steps} steps, repeat {i + 1}: "
                          + ", ".join(f"{w} {runs[w][-1]}" for w in WAYS), flush=True)  # fmt: skip
                keys = ("job_s", "first_step_s", "step_s")
                summary = {
                    "runs": runs,
                    "median": {w: {k: statistics.median(r[k] for r in runs[w]) for k in keys} for w in WAYS},
                    "ratio_to_plain": {w: {k: _ratios(runs, w, k) for k in keys} for w in WAYS[1:]},
                }
                report["results"][f"{backend}-{steps}"] = summary
                for way in WAYS[1:]:
                    r = summary["ratio_to_plain"][way]
                    lines.append(
                        f"{backend:>10} {steps:>4} steps  {way:>8}/plain  "
                        + "  ".join(
                            f"{k} {r[k]['median']:.3f} [{r[k]['min']:.3f}-{r[k]['max']:.3f}]" for k in keys
                        )
                    )
    print("\nratios of paired runs, median [min-max] (mplaunch / hand-written):")
    print("\n".join(lines))
    report["summary"] = lines
    report["time"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    import torch

    report["torch"] = torch.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _use_device(device: str) -> str:
    """Set DEVICE for the recipes and the plain runs; the device in words."""
    if device == "cpu":
        DEVICE.update(device="cpu", nproc_per_node=2)
        return f"CPU: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    count = torch.cuda.device_count()
    DEVICE.update(device="cuda", nproc_per_node=count)
    return f"{count} x {torch.cuda.get_device_name(0)}"


if __name__ == "__main__":
    main()
