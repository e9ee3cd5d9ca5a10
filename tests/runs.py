"""Helpers for tests that run real trainings through `mplaunch`, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "bert_tiny.yaml"
TESTS = Path(__file__).resolve().parent

# Small enough that startup dominates: 2 ranks x micro 4 x accum 2 = 16 samples of 32 tokens a step.
FAST = {
    "data": {"seq_len": 32},
    "model": {"dropout": 0.0},
    "train": {"micro_batch_size": 4, "global_batch_size": 16, "max_steps": 6, "eval_every": 0},
    "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    "checkpoint": {"every_steps": 0},
    "scheduler": {"warmup_steps": 2},
    # The shipped recipe's auto is bf16 on CPUs with native bf16: the same dtype on every host.
    "precision": {"dtype": "fp32"},
}
# FAST for a model.target: built-in model keys beside a target (model.dropout) are refused.
FAST_USER_MODEL = {k: v for k, v in FAST.items() if k != "model"}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def write_recipe(directory: Path, name: str, *layers: dict[str, Any]) -> Path:
    """A recipe extending the shipped tiny BERT, its runs under `directory`/runs."""
    body: dict[str, Any] = {"extends": str(TINY), "name": name, "logging": {"dir": str(directory / "runs")}}
    for layer in layers:
        body = deep_merge(body, layer)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def mplaunch(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would), from the project root."""
    full_env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI without waiting (for tests that interrupt it)."""
    full_env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=full_env,
        start_new_session=True,
    )


def records(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if kind is None or r["kind"] == kind]


def train_record(step: int = 4, **fields: Any) -> dict[str, Any]:
    """A train record as metrics.jsonl holds it, with `fields` replaced."""
    return {
        "kind": "train",
        "step": step,
        "loss": 2.5,
        "loss_scale": None,
        "skipped_steps": 0,
        "samples_per_s": 1234.5,
        "step_time_s": 0.5,
        "mfu": None,
        **fields,
    }


def losses(run_dir: Path) -> dict[int, float]:
    """The latest recorded training loss of every step."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def last_loss(run_dir: Path, n: int = 3) -> float:
    """Mean training loss of the last `n` recorded steps (smooths one step's noise)."""
    by_step = losses(run_dir)
    last = max(by_step)
    return sum(by_step[s] for s in range(last - n + 1, last + 1)) / n


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl records `step` (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(run_dir, "train")):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"mplaunch ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def dead_pid() -> int:
    """The id of a process that has ended (a stale lock's holder)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def explain(result: subprocess.CompletedProcess) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


def faulty_recipe(
    tmp_path: Path, name: str, fault: str, rank: int, step: int, *layers: dict[str, Any], seconds: float = 0.1
) -> Path:
    """A recipe of the user model tests/hang_model.py whose rank `rank` meets `fault` at step `step`
    (hang, sleep, ...): `seconds` per micro-batch for a sleep; `layers` merged over it."""
    return write_recipe(
        tmp_path,
        name,
        FAST_USER_MODEL,
        {
            "model": {
                "name": None,
                "target": "hang_model:build",
                "kwargs": {
                    "vocab_size": 512,
                    "rank": rank,
                    "step": step,
                    "accum": 2,
                    "fault": fault,
                    "seconds": seconds,
                },
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        },
        *layers,
    )
