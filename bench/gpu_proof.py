"""Helpers for bench/gpu_proof.sh: the parts of the GPU proof that are easier in Python.

    python bench/gpu_proof.py init    --out OUT --device D --steps name:cap,...   # summary skeleton
    python bench/gpu_proof.py record  --out OUT --step NAME --rc RC --cap S --wall S [--status S --reason R]
    python bench/gpu_proof.py finish  --out OUT [--results DIR]                    # final summary (+ a copy)
    python bench/gpu_proof.py install --wheels .whl --site /tmp/site --out FILE   # wheels.sh's install
    python bench/gpu_proof.py nccl    --device D --out FILE                         # all-reduce on every GPU
    python bench/gpu_proof.py memory  --device D --size large --micros 16,64 ...    # planner vs measured peak
    python bench/gpu_proof.py recipe  --device D --size base --dir DIR ...          # a recipe for parity
    python bench/gpu_proof.py resize  --device D --scratch DIR --out FILE ...       # 2 ranks -> 1 on resume

The proof's results live in OUT: steps/NAME.json (one per step, written when the
step ends), data/NAME.json (what the step measured, written as it goes),
logs/NAME.log, console.log and summary.json (rewritten after every step).
Everything here but `nccl`, `memory`, `recipe` and `resize` uses the standard
library only, and nothing here imports the launcher's training code: the proof goes
through `python -m launcher ...` and bench/gpu.py, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parent.parent
TIMED_OUT = {124, 137}  # timeout(1): the cap was reached (137: it had to SIGKILL)
CPU_FP16 = "not supported by DeepSpeed on CPU"  # DeepSpeed's refusal, recorded as a skip with its message
GiB = 2**30


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dump(path: Path, body: Any) -> None:
    """Write JSON atomically, so a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- device


def device_name(device: str) -> dict[str, Any]:
    """The GPU's name as nvidia-smi reports it (the results are named by it), or the CPU's."""
    info: dict[str, Any] = {"kind": device}
    if device == "cuda":
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            gpus = [[s.strip() for s in line.split(",")] for line in out.splitlines() if line.strip()]
            info.update(name=gpus[0][0], driver=gpus[0][1], memory=gpus[0][2], count=len(gpus))
        except (OSError, subprocess.SubprocessError, IndexError):
            info.update(name="unknown-gpu", count=0)
    else:
        model = "cpu"
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        info.update(name=f"cpu ({os.cpu_count()} cores, {model})", count=0)
    info["slug"] = re.sub(r"[^A-Za-z0-9.]+", "_", info["name"].split(" (")[0]).strip("_") or "unknown"
    return info


# --------------------------------------------------------------------------- summary


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps = []
    for item in args.steps.split(","):
        name, cap = item.split(":")
        steps.append({"name": name, "status": "not_run", "cap_s": int(cap)})
    _dump(
        out / "summary.json",
        {
            "device": device_name(args.device),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "started_unix": time.time(),
            "options": args.options,
            "caps_total_s": sum(s["cap_s"] for s in steps),
            "complete": False,
            "steps": steps,
        },
    )
    return 0


def _last_error(log: Path) -> str | None:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()] if log.exists() else []
    lines = [ln for ln in lines if ln]
    marked = [ln for ln in lines if re.search(r"error|Error|FAIL|Traceback", ln)]
    found = marked or lines
    return found[-1] if found else None


def _numbers(name: str, out: Path) -> tuple[Any, str | None, str | None]:
    """(numbers, status override, reason) from what the step left in data/ and logs/."""
    data = _load(out / "data" / f"{name}.json")
    log = out / "logs" / f"{name}.log"
    if name == "install" and data and data.get("import_error"):
        return data, None, f"installed, but the import failed: {data['import_error']}"
    if name == "env":
        return _env_numbers(log), None, None
    if name == "gpu_tests":
        return _pytest_numbers(log)
    if name.startswith("b_") and data:
        return _suite_numbers(data)
    if name.startswith("d_") and data is None and log.exists() and CPU_FP16 in log.read_text():
        return None, "skipped", _last_error(log)
    if name == "e_resize" and data:
        return _resize_numbers(data)
    return data, None, None


def _env_numbers(log: Path) -> dict[str, str] | None:
    if not log.exists():
        return None
    pairs = (re.match(r"^(\S+)\s{2,}(.+)$", ln) for ln in log.read_text().splitlines())
    return {m.group(1): m.group(2).strip() for m in pairs if m}


def _pytest_numbers(log: Path) -> tuple[Any, str | None, str | None]:
    if not log.exists():
        return None, None, None
    text = log.read_text(errors="replace")
    outcomes = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.+)$", text, re.M)))
    final = re.findall(r"^=+ (.* in [\d.]+s.*?) =+$", text, re.M)
    numbers = {"counts": counts, "skip_reasons": reasons, "pytest_summary": final[-1] if final else None}
    numbers["tests"] = outcomes
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0)
    if outcomes and ran == 0 and counts.get("skipped"):
        why = "; ".join(reasons) or "skipped"
        return numbers, "skipped", f"all {counts['skipped']} GPU tests skipped ({why})"
    return numbers, None, None


def _suite_numbers(data: dict[str, Any]) -> tuple[Any, str | None, str | None]:
    keep = ("config", "samples_per_s", "tflops", "mfu", "mem_peak_gib")
    keep += ("speedup_vs_fp32", "speedup_vs_tf32", "speedup_vs_bf16")
    rows, failed = [], []
    for row in data.get("rows", []):
        if "error" in row:
            known = CPU_FP16 in row["error"]
            rows.append(
                {"config": row["config"], "status": "skipped" if known else "failed", "reason": row["error"]}
            )
            if not known:
                failed.append(row["config"])
        else:
            rows.append({"status": "ok", **{k: row.get(k) for k in keep}})
    numbers = {"rows": rows, "args": data.get("args")}
    if failed:
        return numbers, "failed", "configurations failed: " + ", ".join(failed)
    return numbers, None, None


def _resize_numbers(data: dict[str, Any]) -> tuple[Any, str | None, str | None]:
    """A skip the resize step declared, or the first backend that failed or drifted past the tolerance."""
    if data.get("skipped"):
        return data, "skipped", data["skipped"]
    problems = []
    for name, entry in data.get("backends", {}).items():
        if entry.get("error"):
            problems.append(f"{name}: {entry['error']}")
        elif entry.get("max_rel_diff") is not None and not entry.get("within_tolerance"):
            problems.append(
                f"{name}: losses after the resume differ by {entry['max_rel_diff']:.2e} relative "
                f"(tolerance {data.get('tolerance')})"
            )
    return data, ("failed" if problems else None), ("; ".join(problems) or None)


def cmd_record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    numbers, override, reason = _numbers(args.step, out)
    if args.status:
        status = args.status
    elif args.rc in TIMED_OUT:
        status, reason = "timed_out", f"still running at its cap of {args.cap} s; stopped (exit {args.rc})"
    elif override:
        status = override
    elif args.rc == 0:
        status = "ok"
    else:
        status = "failed"
        reason = reason or _last_error(out / "logs" / f"{args.step}.log")
    step = {
        "name": args.step,
        "status": status,
        "reason": args.reason or reason,
        "rc": args.rc,
        "cap_s": args.cap,
        "wall_s": round(args.wall, 1),
        "command": args.cmd,
        "log": f"logs/{args.step}.log" if (out / "logs" / f"{args.step}.log").exists() else None,
        "tag": args.tag,
        "numbers": numbers,
    }
    _dump(out / "steps" / f"{args.step}.json", step)
    summary = _load(out / "summary.json") or {"steps": []}
    summary["steps"] = [step if s["name"] == args.step else s for s in summary["steps"]]
    if not any(s["name"] == args.step for s in summary["steps"]):
        summary["steps"].append(step)
    _dump(out / "summary.json", summary)
    print(
        f"gpu-proof: {args.step}: {status} in {args.wall:.1f} s (cap {args.cap} s)"
        + (f": {step['reason']}" if step["reason"] else ""),
        flush=True,
    )
    return 0


def cmd_finish(args: argparse.Namespace) -> int:
    out = Path(args.out)
    summary = _load(out / "summary.json") or {"steps": []}
    summary["complete"] = True
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    summary["total_wall_s"] = round(time.time() - summary.get("started_unix", time.time()), 1)
    summary["statuses"] = {s["name"]: s["status"] for s in summary["steps"]}
    _dump(out / "summary.json", summary)
    print("gpu-proof: " + ", ".join(f"{k} {v}" for k, v in summary["statuses"].items()), flush=True)
    if args.results:
        slug = summary.get("device", {}).get("slug", "unknown")
        target = Path(args.results) / f"gpu-proof-{slug}.json"
        _dump(target, summary)
        print(f"gpu-proof: copied the summary to {target}", flush=True)
    return 0


# --------------------------------------------------------------------------- install

NEEDED = ("deepspeed", "pydantic", "hjson")
PTH = "gpu-proof-site.pth"


def cmd_install(args: argparse.Namespace) -> int:
    """wheels.sh's pip command into --site, then make --site importable even where PYTHONPATH is replaced.

    tests/runs.py starts mplaunch with PYTHONPATH=tests/, which would hide a
    PYTHONPATH-only install from the GPU tests' runs; a .pth file in the user
    (or else the interpreter's) site-packages adds --site to every process.
    """
    wheels = sorted(str(w) for w in Path(args.wheels).glob("*.whl"))
    body: dict[str, Any] = {"wheels": [Path(w).name for w in wheels], "site": args.site}
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--target", args.site, *wheels]
    code = subprocess.run(pip).returncode
    body["pip_exit"] = code
    if code == 0:
        body["pth"] = _write_pth(args.site)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        check = f"import {', '.join(NEEDED)}; print(deepspeed.__version__, pydantic.VERSION, end='')"
        probe = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
        body["import_without_pythonpath"] = probe.returncode == 0
        if probe.returncode == 0:
            body["deepspeed"], body["pydantic"] = probe.stdout.split()
        else:
            body["import_error"] = (probe.stderr.strip().splitlines() or ["?"])[-1]
            print(probe.stderr, file=sys.stderr)
    _dump(Path(args.out), body)
    print(json.dumps(body, indent=2))
    return 0 if code == 0 and body.get("import_without_pythonpath") else 1


def _write_pth(site_dir: str) -> str | None:
    import site
    import sysconfig

    candidates = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    for directory in [*candidates, sysconfig.get_paths()["purelib"]]:
        try:
            os.makedirs(directory, exist_ok=True)
            (Path(directory) / PTH).write_text(site_dir + "\n")
        except OSError:
            continue
        return str(Path(directory) / PTH)
    return None


# --------------------------------------------------------------------------- a: NCCL


def cmd_nccl(args: argparse.Namespace) -> int:
    """Start one process per visible GPU (2 on CPU, gloo) that all-reduce and report."""
    if args.device == "cuda":
        import torch

        nproc = torch.cuda.device_count()
        if nproc == 0:
            print("error: no CUDA device is visible", file=sys.stderr)
            return 1
    else:
        nproc = 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
    ]
    code = subprocess.run(
        [*cmd, __file__, "nccl-worker", "--device", args.device, "--out", args.out]
    ).returncode
    if code == 0:
        print(json.dumps(_load(Path(args.out)), indent=2))
    return code


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cmd_nccl_worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dev, backend, numel = torch.device("cuda"), "nccl", 64 * 2**20  # 256 MiB of fp32
    else:
        dev, backend, numel = torch.device("cpu"), "gloo", 2**18
    dist.init_process_group(backend)
    x = torch.full((numel,), float(rank + 1), device=dev)
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    correct = bool(torch.all(x == expected).item())
    iters = 5
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    names: list[Any] = [None] * world
    dist.all_gather_object(names, name)
    size = numel * 4
    if rank == 0:
        _dump(
            Path(args.out),
            {
                "backend": backend,
                "nccl_version": _nccl_version() if backend == "nccl" else None,
                "world_size": world,
                "devices": names,
                "all_reduce_correct": correct,
                "all_reduce_bytes": size,
                "all_reduce_ms": seconds * 1e3,
                # nccl-tests' bus bandwidth: 2 (n-1)/n of the buffer crosses each link
                "bus_bandwidth_gbps": size * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else None,
            },
        )
    dist.destroy_process_group()
    return 0 if correct else 1


# --------------------------------------------------------------------------- c: memory


def _gpu_bench() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu  # bench/gpu.py: recipe() and measure()

    return gpu


def _suite_args(args: argparse.Namespace, micro: int) -> argparse.Namespace:
    return argparse.Namespace(
        steps=args.steps,
        compile=False,
        zero=args.zero,
        device=args.device,
        log_every=args.log_every,
        micro=micro,
    )


def parse_plan(text: str) -> dict[str, Any]:
    """The recipe's column (marked *) of `mplaunch plan`'s table, in GiB, by row name."""
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("GiB per GPU"))
    stages = re.findall(r"stage (\d)(\*?)", lines[head])
    column = next(i for i, (_, star) in enumerate(stages) if star)
    rows: dict[str, Any] = {"stage": int(stages[column][0])}
    for ln in lines[head + 1 :]:
        m = re.match(r"^(\S.*?)\s{2,}(\S+(?:\s+\S+)*)$", ln)
        if not m:
            break
        cells = m.group(2).split()
        if len(cells) != len(stages):
            break
        value = cells[column]
        try:
            rows[m.group(1)] = float(value)
        except ValueError:
            rows[m.group(1)] = value
    return rows


def cmd_memory(args: argparse.Namespace) -> int:
    """For each micro-batch: the planner's predicted peak, then a real run's max_memory_allocated."""
    gpu = _gpu_bench()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "size": args.size,
        "seq_len": args.seq,
        "dtype": args.dtype,
        "zero": args.zero,
        "micros": [],
    }
    code = 0
    for micro in (int(m) for m in args.micros.split(",")):
        path = gpu.recipe(scratch, args.size, args.seq, args.dtype, "deepspeed", _suite_args(args, micro))
        entry: dict[str, Any] = {"micro_batch_size": micro, "recipe": path.name}
        body["micros"].append(entry)
        plan_cmd = [sys.executable, "-m", "launcher", "plan", str(path)]
        if args.device == "cpu":  # no GPU to size against; the prediction does not depend on it
            plan_cmd += ["--gpu-memory", "80GB"]
        plan = subprocess.run(plan_cmd, cwd=ROOT, capture_output=True, text=True)
        print(plan.stdout + plan.stderr, flush=True)
        try:
            predicted = parse_plan(plan.stdout)
            entry["predicted_gib"] = predicted
            entry["predicted_total_gib"] = predicted.get("total")
            # max_memory_allocated sees neither the CUDA context nor the allocator's slack
            context = predicted.get("CUDA context") or 0.0
            entry["predicted_allocated_gib"] = round(predicted["total"] - context, 3)
        except (StopIteration, KeyError, TypeError, ValueError):
            entry["plan_error"] = (plan.stderr.strip().splitlines() or ["unreadable plan table"])[-1]
            code = 1
        _dump(Path(args.out), body)
        measured = gpu.measure(path, args.warmup_records)
        shutil.rmtree(
            RunDir.of(scratch / "runs" / path.stem).checkpoints, ignore_errors=True
        )  # GBs we never read
        print(json.dumps(measured), flush=True)
        entry["measured"] = measured
        if "error" in measured:
            code = 1
        else:
            entry["mfu"] = measured.get("mfu")
            entry["measured_peak_gib"] = measured.get("mem_peak_gib")
            if entry.get("measured_peak_gib") and entry.get("predicted_allocated_gib"):
                entry["measured_over_predicted"] = (
                    entry["measured_peak_gib"] / entry["predicted_allocated_gib"]
                )
        _dump(Path(args.out), body)
    return code


# --------------------------------------------------------------------------- d: parity recipe


def cmd_recipe(args: argparse.Namespace) -> int:
    """Write a synthetic-data BERT recipe (bench/gpu.py's) for `mplaunch parity`; print its path."""
    gpu = _gpu_bench()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(gpu.recipe(directory, args.size, args.seq, args.dtype, args.backend, _suite_args(args, args.micro)))
    return 0


# --------------------------------------------------------------------------- e: resize

# The sharded configurations the resize step moves from 2 ranks to 1 (name: backend, zero.stage).
RESIZED = {"fsdp2_zero3": ("accelerate", 3), "deepspeed_zero2": ("deepspeed", 2)}


def _resize_recipe(args: argparse.Namespace, name: str, backend: str, stage: int, steps: int) -> Path:
    """bench/gpu.py's synthetic BERT recipe, made resizable: 2 ranks, a constant LR (a run stopped at
    --stop and lengthened sees the LR of one that never stopped), no dropout (a rank's random stream
    does not follow its samples to another rank), a checkpoint at --stop, a loss every step."""
    import yaml

    gpu = _gpu_bench()
    scratch = Path(args.scratch)
    suite = argparse.Namespace(
        steps=steps, compile=False, zero=stage, device=args.device, log_every=1, micro=args.micro
    )
    body = yaml.safe_load(gpu.recipe(scratch, args.size, args.seq, args.dtype, backend, suite).read_text())
    body["name"] = name
    body["model"]["dropout"] = 0.0
    body["scheduler"] = {"name": "constant"}
    body["train"].pop("grad_accum", None)  # the global batch sets it, for each world size
    body["train"]["global_batch_size"] = args.global_batch
    body["launch"]["nproc_per_node"] = 2
    body["checkpoint"] = {"every_steps": args.stop, "keep": 2}
    body["logging"]["precision_every"] = 0
    if args.device == "cpu":
        body["precision"].pop("allow_tf32", None)  # a GPU setting; the CPU warns about it
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _mplaunch(*argv: str) -> dict[str, Any]:
    """Run mplaunch, its output streamed into the step's log; the exit code, wall time and error line."""
    started = time.perf_counter()
    print(f"$ mplaunch {' '.join(argv)}", flush=True)
    cmd = [sys.executable, "-m", "launcher", *argv]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.strip())
    result: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        marked = [ln for ln in lines if re.search(r"error|Error|refus|cannot", ln)]
        result["error"] = (marked or [ln for ln in lines if ln] or [f"exit {proc.returncode}"])[-1]
    return result


def _run_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = RunDir.of(run_dir).metrics.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _resize_one(
    args: argparse.Namespace, name: str, backend: str, stage: int, save: Callable[[str, dict[str, Any]], None]
) -> None:
    """Straight 2-rank run to --steps; a 2-rank run to --stop resumed on 1 rank to --steps; compare."""
    entry: dict[str, Any] = {"backend": backend, "zero_stage": stage}
    save(name, entry)
    runs = Path(args.scratch) / "runs"
    for run, steps in (("straight", args.steps), ("first", args.stop)):
        entry[run] = _mplaunch(str(_resize_recipe(args, f"{name}-{run}", backend, stage, steps)))
        save(name, entry)
        if entry[run]["rc"] != 0:
            entry["error"] = f"the {run} 2-rank run failed: {entry[run]['error']}"
            save(name, entry)
            return
    moved = runs / f"{name}-first"
    entry["resumed"] = _mplaunch(
        "--resume", str(moved), f"train.max_steps={args.steps}", "launch.nproc_per_node=1"
    )
    if entry["resumed"]["rc"] != 0:
        entry["error"] = f"mplaunch --resume on 1 rank failed: {entry['resumed']['error']}"
        save(name, entry)
        return
    straight = {r["step"]: r["loss"] for r in _run_records(runs / f"{name}-straight") if r["kind"] == "train"}
    records = _run_records(moved)
    after = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and r["step"] > args.stop}
    compared = sorted(set(after) & set(straight))
    entry["losses"] = {str(s): {"resumed": after[s], "straight": straight[s]} for s in compared}
    entry["compared_steps"] = compared
    entry["max_rel_diff"] = max(
        (abs(after[s] - straight[s]) / abs(straight[s]) for s in compared), default=None
    )
    entry["within_tolerance"] = entry["max_rel_diff"] is not None and entry["max_rel_diff"] <= args.tolerance
    events = [r for r in records if r["kind"] == "event" and r.get("event") == "resized"]
    entry["resized"] = (
        {k: events[-1].get(k) for k in ("step", "from_world", "to_world", "seconds", "how")}
        if events
        else None
    )
    if compared != list(range(args.stop + 1, args.steps + 1)):
        entry["error"] = f"losses after the resume cover steps {compared}, not {args.stop + 1}-{args.steps}"
    elif not events or (events[-1]["from_world"], events[-1]["to_world"]) != (2, 1):
        entry["error"] = "no resized event from 2 ranks to 1 in metrics.jsonl"
    save(name, entry)


def cmd_resize(args: argparse.Namespace) -> int:
    """For FSDP2 and DeepSpeed ZeRO-2: stop a 2-rank run at --stop, resume it on 1 rank, compare its
    losses with a 2-rank run that never stopped, and record the workers' `resized` event."""
    body: dict[str, Any] = {
        "size": args.size,
        "seq_len": args.seq,
        "dtype": args.dtype,
        "micro_batch_size": args.micro,
        "global_batch_size": args.global_batch,
        "stop_step": args.stop,
        "steps": args.steps,
        "from_world": 2,
        "to_world": 1,
        "tolerance": args.tolerance,
        "backends": {},
    }
    out = Path(args.out)
    if args.device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count < 2:
            body["skipped"] = f"needs 2 GPUs; this machine has {count}"
            _dump(out, body)
            print(f"resize: skipped: {body['skipped']}", flush=True)
            return 0
    shutil.rmtree(Path(args.scratch) / "runs", ignore_errors=True)  # runs of an earlier call would resume
    Path(args.scratch).mkdir(parents=True, exist_ok=True)

    def save(name: str, entry: dict[str, Any]) -> None:
        body["backends"][name] = entry
        _dump(out, body)

    for name, (backend, stage) in RESIZED.items():
        _resize_one(args, name, backend, stage, save)
    for name, entry in body["backends"].items():
        event = entry.get("resized") or {}
        print(
            f"resize: {name}: steps {args.stop + 1}-{args.steps} after the resume against the straight run: "
            f"max relative difference {entry.get('max_rel_diff') or 0:.2e}; "
            f"{event.get('how')} ({event.get('seconds')} s)",
            flush=True,
        )
    _, failed, reason = _resize_numbers(body)
    if failed:
        print(f"resize: {reason}", file=sys.stderr, flush=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("init")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--steps", required=True, help="name:cap,name:cap,... in run order")
    s.add_argument("--options", default="")
    s = sub.add_parser("record")
    s.add_argument("--out", required=True)
    s.add_argument("--step", required=True)
    s.add_argument("--rc", type=int, default=None, help="exit status (none: the step did not run)")
    s.add_argument("--tag", default=None, help="GPU_PROOF_TAG its processes carried")
    s.add_argument("--cap", type=int, default=0)
    s.add_argument("--wall", type=float, default=0.0)
    s.add_argument("--status", choices=["ok", "failed", "timed_out", "skipped"], default=None)
    s.add_argument("--reason", default=None)
    s.add_argument("--cmd", default="", help="the step's command line, for the record")
    s = sub.add_parser("finish")
    s.add_argument("--out", required=True)
    s.add_argument("--results", default=None, help="also copy the summary to DIR/gpu-proof-<device>.json")
    s = sub.add_parser("install")
    s.add_argument("--wheels", default=".whl")
    s.add_argument("--site", default="/tmp/site")
    s.add_argument("--out", required=True)
    for name in ("nccl", "nccl-worker"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
        s.add_argument("--out", required=True)
    for name in ("memory", "recipe"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
        s.add_argument("--size", default="base")
        s.add_argument("--seq", type=int, default=128)
        s.add_argument("--dtype", default="bf16")
        s.add_argument("--zero", type=int, default=2)
        s.add_argument("--backend", default="deepspeed", choices=["deepspeed", "accelerate"])
        s.add_argument("--steps", type=int, default=15)
        s.add_argument("--log-every", type=int, default=5)
    s = sub.choices["memory"]
    s.add_argument("--micros", default="16,64")
    s.add_argument("--warmup-records", type=int, default=1)
    s.add_argument("--scratch", required=True)
    s.add_argument("--out", required=True)
    s = sub.choices["recipe"]
    s.add_argument("--micro", type=int, default=8)
    s.add_argument("--dir", required=True)
    s = sub.add_parser("resize")
    s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    s.add_argument("--size", default="tiny")
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--micro", type=int, default=8)
    s.add_argument("--global-batch", type=int, default=32)
    s.add_argument("--dtype", default="fp32")
    s.add_argument("--stop", type=int, default=4, help="the 2-rank run saves and stops here")
    s.add_argument(
        "--steps", type=int, default=8, help="the resumed 1-rank run and the straight run end here"
    )
    s.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest relative loss difference that passes"
    )
    s.add_argument("--scratch", required=True)
    s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    handler = {
        "init": cmd_init,
        "record": cmd_record,
        "finish": cmd_finish,
        "install": cmd_install,
        "nccl": cmd_nccl,
        "nccl-worker": cmd_nccl_worker,
        "memory": cmd_memory,
        "recipe": cmd_recipe,
        "resize": cmd_resize,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
