"""What the precision x-ray costs: a training step with it against one without, and a job at the default cadence.

The training: recipes/bert_tiny.yaml (tiny BERT masked LM, sequence 64, micro-batch 8, global batch
32, 2 CPU ranks over gloo, or a rank per GPU over NCCL), without evaluation or checkpoints, bf16 on
DeepSpeed ZeRO-2 and fp16 on Accelerate DDP (DeepSpeed refuses fp16 on a CPU). Three ways run
side by side through mplaunch, as a user runs it, their order rotated in every repeat:

    off      logging.precision_every=0: no x-ray
    every    logging.precision_every=1: an x-ray every step, so its step time is an x-ray step's
    default  the key left out: the recipe's default cadence (50: steps 1, 50, 100, ...)

Measured per run: the mean step time after the warm-up intervals, from the `step_time_s` of
RUN_DIR/metrics.jsonl's `train` records (each interval's wall time over its steps: the x-ray's
measuring, its all_gather, and rank 0 writing and judging its record included). Step 1's x-ray,
which also sketches the gradients for `mplaunch parity`, falls in the warm-up and is not measured.
Printed: medians over the repeats, and the median [min-max] of the runs paired within a repeat:

    per x-ray step    every - off (ms) and every / off
    amortised         default / off: what the default cadence costs the whole job
    predicted         1 + (share of measured steps with an x-ray) x (every / off - 1)
    in the run        the default run's intervals that hold an x-ray against those that do not,
                      the difference in ms per x-ray (no second run in it: less noise, fewer samples)

Not a test: timings depend on the machine, so run it on an idle one. Every run records the share
of the machine's CPUs that other processes used meanwhile (/proc/stat's busy time less this
script's children's); a repeat in which that passed 5 % in any run is set aside (kept in the
JSON) and run again, up to --retries times, and the summary says when a kept run passed it.

    python bench/xray_cost.py [--repeats 5] [--steps 200] [--backends deepspeed:bf16 accelerate:fp16]
                              [--log-every 10] [--warmup-intervals 1] [--warmup-steps 20]
                              [--retries 2] [--device cpu|cuda] [--out FILE]

Writes bench/results/xray-cost-cpu.json (--device cuda: xray-cost-GPU_NAME.json) and the printed
lines as the .txt beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import overhead  # bench/, this script's own folder: the device setup and its DEVICE
from gpu_proof import device_name

from launcher.rundir.layout import RunDir

ROOT = overhead.ROOT
WAYS: dict[str, int | None] = {"off": 0, "every": 1, "default": None}  # None: the recipe's default
NOISY = 0.05  # other processes' share of the CPUs in a run above which the summary says it was disturbed


def _recipe(tmp: Path, backend: str, dtype: str, steps: int, way: str, log_every: int) -> Path:
    import yaml

    logging: dict[str, Any] = {
        "dir": str(tmp / "runs"),
        "every_steps": log_every,
        "tensorboard": False,
        "progress": False,
    }
    if WAYS[way] is not None:
        logging["precision_every"] = WAYS[way]
    body = {
        "extends": str(ROOT / "recipes" / "bert_tiny.yaml"),
        "name": f"xray-{backend}-{way}",
        "train": {"max_steps": steps, "eval_every": 0},
        "precision": {"dtype": dtype},
        "backend": backend,
        "zero": {"stage": 2 if backend == "deepspeed" else 0},  # Accelerate runs DDP on a CPU anyway
        "launch": dict(overhead.DEVICE),
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "logging": logging,
    }
    path = tmp / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat), None where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this script's finished children: mplaunch, torchrun and the ranks, each waited for."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed_mplaunch(recipe: Path) -> tuple[subprocess.CompletedProcess[str], float, float | None]:
    """Run `mplaunch RECIPE` to its end (SystemExit if it fails): the finished process, its wall
    seconds, and the share of all the machine's cores other processes used meanwhile (the timing's
    noise; None where /proc/stat is not there)."""
    busy, own = _busy_cpu_s(), _own_cpu_s()
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "launcher", str(recipe)], cwd=ROOT, capture_output=True, text=True
    )
    job_s = time.time() - started
    busy_after = _busy_cpu_s()
    foreign = None if busy is None or busy_after is None else busy_after - busy - (_own_cpu_s() - own)
    cores = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
    if done.returncode:
        raise SystemExit(f"mplaunch {recipe} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done, job_s, None if foreign is None else max(0.0, foreign) / (job_s * cores)


def write_report(
    report: dict[str, Any], summary: list[str], out: Path, printed: list[str], say: Callable[[str], None]
) -> None:
    """Print the summary lines, finish `report` (load after, time, torch) and write it as JSON to
    `out`, with every printed line as the .txt beside it."""
    report["summary"] = summary
    for line in summary:
        say(line)
    report["load_after"] = os.getloadavg()
    report["time"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    import torch

    report["torch"] = torch.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".txt").write_text("\n".join(printed) + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt').name}")


def run(
    tmp: Path, backend: str, dtype: str, steps: int, way: str, log_every: int, skip: int
) -> dict[str, Any]:
    """One mplaunch run: its mean step time after `skip` intervals, its intervals and its x-ray steps."""
    recipe = _recipe(tmp, backend, dtype, steps, way, log_every)
    run_dir = tmp / "runs" / f"xray-{backend}-{way}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    done, job_s, other = timed_mplaunch(recipe)
    records = [json.loads(line) for line in RunDir.of(run_dir).metrics.read_text().splitlines()]
    every = json.loads(RunDir.of(run_dir).plan_file.read_text())["recipe"]["logging"]["precision_every"]
    xrays = [r["step"] for r in records if r["kind"] == "precision"]
    expected = [s for s in range(1, steps + 1) if every and (s == 1 or s % every == 0)]
    if xrays != expected:  # the configuration did not take effect as this benchmark assumes
        raise SystemExit(f"{run_dir}: x-rays at steps {xrays}, expected {expected} (precision_every {every})")
    intervals, last = [], 0
    for r in records:
        if r["kind"] == "train":
            held = sum(last < s <= r["step"] for s in xrays)
            intervals.append(
                {"step": r["step"], "steps": r["step"] - last, "step_time_s": r["step_time_s"], "xrays": held}
            )
            last = r["step"]
    measured = intervals[skip:]
    if not measured:
        raise SystemExit(f"{run_dir}: {len(intervals)} intervals, none left after {skip} of warm-up")
    n = sum(i["steps"] for i in measured)
    return {
        "job_s": job_s,
        "step_s": sum(i["step_time_s"] * i["steps"] for i in measured) / n,
        "measured_steps": n,
        "measured_xrays": sum(i["xrays"] for i in measured),
        "precision_every": every,
        "load_1min": load,
        "other_cpu_share": other,
        "intervals": intervals,
    }


def _in_run(r: dict[str, Any], skip: int) -> float | None:
    """Seconds one x-ray adds, from one run's intervals with and without one (None without both)."""
    measured = r["intervals"][skip:]
    clear = [i["step_time_s"] for i in measured if not i["xrays"]]
    if not clear or len(clear) == len(measured):
        return None
    # An interval of n steps holding x x-rays takes n * t + x * cost, t a step without one.
    t = statistics.median(clear)
    return statistics.median((i["step_time_s"] - t) * i["steps"] / i["xrays"] for i in measured if i["xrays"])


def _share(r: dict[str, Any]) -> str:
    return "?" if r["other_cpu_share"] is None else f"{r['other_cpu_share']:.0%} of the CPUs"


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: dict[str, list[dict[str, Any]]], skip: int) -> dict[str, Any]:
    off, every, default = runs["off"], runs["every"], runs["default"]
    per_step = [e["step_s"] / o["step_s"] for e, o in zip(every, off, strict=True)]
    share = statistics.median(d["measured_xrays"] / d["measured_steps"] for d in default)
    in_run = [c for c in (_in_run(d, skip) for d in default) if c is not None]
    return {
        "median_step_s": {w: statistics.median(r["step_s"] for r in runs[w]) for w in WAYS},
        "median_job_s": {w: statistics.median(r["job_s"] for r in runs[w]) for w in WAYS},
        "xray_step_cost_s": _spread([e["step_s"] - o["step_s"] for e, o in zip(every, off, strict=True)]),
        "xray_step_ratio": _spread(per_step),
        "amortised_ratio": _spread([d["step_s"] / o["step_s"] for d, o in zip(default, off, strict=True)]),
        "default_xray_share": share,
        "predicted_amortised_ratio": 1 + share * (statistics.median(per_step) - 1),
        "in_run_xray_cost_s": _spread(in_run) if in_run else None,
        "other_cpu_share_max": max((r["other_cpu_share"] or 0.0 for w in WAYS for r in runs[w]), default=0.0),
    }


def _ms(x: dict[str, float]) -> str:
    return f"{x['median'] * 1e3:+.1f} ms [{x['min'] * 1e3:+.1f} to {x['max'] * 1e3:+.1f}]"


def _ratio(x: dict[str, float]) -> str:
    return f"{x['median']:.4f} [{x['min']:.4f}-{x['max']:.4f}]"


def lines_for(name: str, s: dict[str, Any]) -> list[str]:
    """The printed summary of one backend."""
    med, in_run = s["median_step_s"], s["in_run_xray_cost_s"]
    pad = " " * (len(name) + 2)
    lines = [
        f"{name}  step time: off {med['off'] * 1e3:.1f} ms, every {med['every'] * 1e3:.1f} ms, "
        f"default {med['default'] * 1e3:.1f} ms",
        f"{pad}per x-ray step: {_ms(s['xray_step_cost_s'])}, ratio {_ratio(s['xray_step_ratio'])}",
        f"{pad}amortised at the default cadence (default/off): {_ratio(s['amortised_ratio'])}; predicted "
        f"{s['predicted_amortised_ratio']:.4f} ({s['default_xray_share']:.1%} of the timed steps x-rayed)",
        f"{pad}in the default runs' own intervals: "
        + (
            f"{_ms(in_run)} per x-ray" if in_run else "n/a (no timed interval with an x-ray, or none without)"
        ),
    ]
    if s["other_cpu_share_max"] > NOISY:
        lines.append(
            f"{pad}disturbed: other processes used up to {s['other_cpu_share_max']:.0%} of the CPUs in a run"
        )
    return lines


def measure(tmp: Path, spec: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """One backend's runs, the ways side by side, and their summary; a disturbed repeat is run again."""
    backend, dtype = spec.split(":")
    if args.warmup_steps:  # the token, op and page caches, before anything is timed
        run(tmp, backend, dtype, args.warmup_steps, "off", args.log_every, 0)
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    set_aside: list[dict[str, dict[str, Any]]] = []
    names = list(WAYS)
    for i in range(args.repeats):
        for attempt in range(args.retries + 1):
            done = {
                way: run(tmp, backend, dtype, args.steps, way, args.log_every, args.warmup_intervals)
                for way in names[i % len(names) :] + names[: i % len(names)]  # each way goes first in turn
            }
            line = ", ".join(
                f"{w} {done[w]['step_s'] * 1e3:.1f} ms/step (job {done[w]['job_s']:.1f} s, others {_share(done[w])})"
                for w in WAYS
            )
            if attempt == args.retries or all((r["other_cpu_share"] or 0.0) <= NOISY for r in done.values()):
                break
            say(f"{spec} repeat {i + 1}: {line}: disturbed, set aside and run again")
            set_aside.append(done)
        say(f"{spec} repeat {i + 1}: {line}")
        for way, r in done.items():
            runs[way].append(r)
    return {"summary": summarise(runs, args.warmup_intervals), "runs": runs, "set_aside": set_aside}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument(
        "--backends", nargs="+", default=["deepspeed:bf16", "accelerate:fp16"], help="BACKEND:DTYPE"
    )
    p.add_argument("--log-every", type=int, default=10, help="logging.every_steps: the intervals timed")
    p.add_argument("--warmup-intervals", type=int, default=1, help="intervals left out of each run's start")
    p.add_argument("--warmup-steps", type=int, default=20, help="an untimed run per backend first (0: none)")
    p.add_argument(
        "--retries", type=int, default=2, help="times a repeat disturbed by other processes is rerun"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one rank per visible GPU")
    p.add_argument("--out", type=Path, help="default: bench/results/xray-cost-cpu.json, or -GPU_NAME.json")
    args = p.parse_args()
    described = overhead._use_device(args.device)
    info = device_name(args.device)  # named as bench/gpu_proof.py names its results: NVIDIA_H200, or cpu
    out = args.out or ROOT / "bench" / "results" / f"xray-cost-{info['slug']}.json"
    printed: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        printed.append(line)

    say(f"{described}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report: dict[str, Any] = {
        "device": described,
        "device_info": info,
        "recipe": "recipes/bert_tiny.yaml",
        "steps": args.steps,
        "log_every": args.log_every,
        "warmup_intervals": args.warmup_intervals,
        "world_size": overhead.DEVICE["nproc_per_node"],
        "repeats": args.repeats,
        "disturbed_above": NOISY,
        "load_before": os.getloadavg(),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for spec in args.backends:
            report["results"][spec] = measure(Path(d), spec, args, say)
    say(f"\nmedians over {args.repeats} repeats; paired ratios median [min-max] (x-ray / no x-ray):")
    summary = [line for spec, r in report["results"].items() for line in lines_for(spec, r["summary"])]
    write_report(report, summary, out, printed, say)


if __name__ == "__main__":
    main()
