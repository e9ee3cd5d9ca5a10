"""The GPU performance suite: BERT masked-LM through `mplaunch`, every precision, both backends.

For each model size x sequence length x precision x backend it trains a
short run on synthetic tokens and reads samples/s, tokens/s, achieved
TFLOP/s, MFU and peak memory from the run's metrics.jsonl (medians over
the records after warm-up), then prints one table with the speedup of
each mixed precision over fp32, over tf32 and (for fp8) over bf16, and writes a JSON file
naming the device, driver and versions (rewritten after every
configuration, so an interrupted suite keeps what it measured).
`--micro N` sets one micro-batch for every configuration instead of the
MICRO table, and adds `-mbN` to the config names.

    python bench/gpu.py                                   # the full suite on one GPU
    python bench/gpu.py --device cpu --sizes tiny --seqs 32 --dtypes fp32,bf16 --steps 4   # a smoke run

`tf32` is fp32 with precision.allow_tf32=true; `fp32` has it off. Not a test:
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parent.parent
# Micro-batch per (size, seq_len): large enough to keep an H100 busy, small enough for 80 GB in fp32.
MICRO = {("base", 128): 64, ("base", 512): 16, ("large", 128): 32, ("large", 512): 8}
PRECISION = {
    "fp32": {"dtype": "fp32", "allow_tf32": False},
    "tf32": {"dtype": "fp32", "allow_tf32": True},
    "bf16": {"dtype": "bf16"},
    "fp16": {"dtype": "fp16"},
    "fp8": {"dtype": "fp8"},  # torchao float8 matmuls, bf16 elsewhere; emulated (slow) on a CPU
}


def recipe(tmp: Path, size: str, seq: int, precision: str, backend: str, args: argparse.Namespace) -> Path:
    micro = args.micro or MICRO.get((size, seq), 8)
    name = f"{size}-{seq}-{precision}-{backend}" + (f"-mb{micro}" if args.micro else "")
    body = {
        "name": name,
        "model": {"name": "bert-mlm", "size": size},
        "data": {"kind": "synthetic", "seq_len": seq, "num_samples": max(4096, micro * args.steps * 2)},
        "train": {
            "micro_batch_size": micro,
            "grad_accum": 1,
            "max_steps": args.steps,
            "compile": args.compile,
        },
        "scheduler": {"warmup_steps": 0},
        "precision": PRECISION[precision],
        "backend": backend,
        "zero": {"stage": args.zero},
        "launch": {"device": args.device, "nproc_per_node": 1},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "logging": {
            "dir": str(tmp / "runs"),
            "every_steps": args.log_every,
            "tensorboard": False,
            "progress": False,
        },
    }
    if args.device == "cpu" and precision == "tf32":
        body["precision"] = {"dtype": "fp32"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def measure(path: Path, warmup_records: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "launcher", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    name = path.stem
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        return {"config": name, "error": (lines or result.stderr.splitlines() or ["failed"])[-1]}
    run_dir = path.parent / "runs" / name
    train = [json.loads(line) for line in RunDir.of(run_dir).metrics.read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"][warmup_records:] or [
        r for r in train if r["kind"] == "train"
    ]

    def median(field: str) -> float | None:
        values = [r[field] for r in train if r.get(field) is not None]
        return statistics.median(values) if values else None

    peak = [r["mem_peak_bytes"] for r in train if r.get("mem_peak_bytes") is not None]
    return {
        "config": name,
        "samples_per_s": median("samples_per_s"),
        "tokens_per_s": median("tokens_per_s"),
        "tflops": median("tflops"),
        "mfu": median("mfu"),
        "mem_peak_gib": max(peak) / 2**30 if peak else None,
        "step_time_s": median("step_time_s"),
    }


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device}
    if device == "cuda":
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[0]
            )
            info["gpu"], info["driver"], info["memory"] = (s.strip() for s in out.split(","))
        except (OSError, subprocess.SubprocessError, ValueError):
            info["gpu"] = "unknown"
    else:
        info["cpu"] = f"{os.cpu_count()} cores"
    from importlib import metadata

    for dist in ("torch", "deepspeed", "accelerate", "transformers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def speedups(rows: list[dict[str, Any]]) -> None:
    """Add speedup_vs_fp32, _tf32 and _bf16 to every row, from the same size, seq and backend."""
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        size, seq, precision, rest = row["config"].split("-", 3)
        for base in ("fp32", "tf32", "bf16"):
            ref = by_name.get(f"{size}-{seq}-{base}-{rest}", {})
            ok = row.get("samples_per_s") and ref.get("samples_per_s")
            row[f"speedup_vs_{base}"] = row["samples_per_s"] / ref["samples_per_s"] if ok else None


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'config':<28} {'samples/s':>10} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'vs fp32':>8} {'vs tf32':>8} {'vs bf16':>8}"
    lines = [head, "-" * len(head)]

    def f(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "n/a"

    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:<28} error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"{r['config']:<28} {f(r['samples_per_s'], ',.1f'):>10} {f(r['tokens_per_s'], ',.0f'):>11} "
            f"{f(r['tflops'], '.1f'):>8} {mfu:>6} {f(r['mem_peak_gib'], '.2f'):>9} "
            f"{f(r['speedup_vs_fp32'], '.2f'):>8} {f(r['speedup_vs_tf32'], '.2f'):>8} "
            f"{f(r['speedup_vs_bf16'], '.2f'):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="base,large")
    p.add_argument("--seqs", default="128,512")
    p.add_argument("--dtypes", default="fp32,tf32,bf16,fp16")
    p.add_argument("--backends", default="deepspeed,accelerate")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--warmup-records", type=int, default=2, help="metrics records skipped as warm-up")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument(
        "--micro", type=int, default=None, help="micro-batch for every config (default: MICRO table)"
    )
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    info = device_info(args.device)
    out = (
        args.out or ROOT / "bench" / "results" / f"gpu-{info.get('gpu', args.device).replace(' ', '_')}.json"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for size in args.sizes.split(","):
            for seq in (int(s) for s in args.seqs.split(",")):
                for backend in args.backends.split(","):
                    for precision in args.dtypes.split(","):
                        row = measure(recipe(tmp, size, seq, precision, backend, args), args.warmup_records)
                        rows.append(row)
                        print(f"{row['config']}: {row.get('samples_per_s', row.get('error'))}", flush=True)
                        speedups(rows)
                        # after every row, so a killed suite keeps what it measured
                        write(out, info, args, rows)
    print(table(rows))
    print(f"wrote {out}")
    return 0


def write(out: Path, info: dict[str, Any], args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "info": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
