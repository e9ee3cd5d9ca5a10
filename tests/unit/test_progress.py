"""The live progress bar and its lines, without a run: stats text, the metrics tail, the bar, torchrun's noise filter."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console as RichConsole

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import validate
from launcher.run import progress
from launcher.run.progress import Bar, MetricsTail, TorchrunFilter
from launcher.rundir.watchdog import Beat
from tests.runs import train_record


@pytest.mark.parametrize(
    ("fields", "fp16", "text"),
    [
        ({}, False, "loss 2.5000 | 1,234.5 samples/s"),
        ({"loss_scale": 1024.0}, True, "loss 2.5000 | scale 1024 | skipped 0 | 1,234.5 samples/s"),
        ({"skipped_steps": 2}, False, "loss 2.5000 | skipped 2 | 1,234.5 samples/s"),
        ({"mfu": 0.4123}, False, "loss 2.5000 | 1,234.5 samples/s | MFU 41.2%"),
    ],
)
def test_stats_text(fields: dict[str, Any], fp16: bool, text: str) -> None:
    assert progress.stats_text(train_record(**fields), fp16) == text


def test_plain_line_and_duration() -> None:
    line = progress.plain_line(train_record(step=4), 10, False)
    assert line == "step 4/10 | loss 2.5000 | 1,234.5 samples/s | eta 0:03"
    assert progress.duration(59.9) == "0:59"
    assert progress.duration(3723) == "1:02:03"


def test_metrics_tail_reads_on_and_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_record(step=99)) + "\n")  # an earlier attempt's: not this run's
    tail = MetricsTail(path)
    assert tail.poll() is None
    line = json.dumps(train_record(step=101))
    with open(path, "a") as f:
        f.write(json.dumps(train_record(step=100)) + "\n" + json.dumps({"kind": "event", "step": 100}) + "\n")
        f.write(line[:10])  # still being written
    assert tail.poll()["step"] == 100  # type: ignore[index]
    with open(path, "a") as f:
        f.write(line[10:] + "\n")
    assert tail.poll()["step"] == 101  # type: ignore[index]
    assert tail.poll()["step"] == 101  # type: ignore[index]


def _render(bar: Bar) -> str:
    console = RichConsole(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    console.print(bar.progress)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_bar_shows_rank0_step_and_the_newest_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    bar = Bar(10, True, path, RichConsole(file=io.StringIO()))
    bar.update({})
    assert "setup" in _render(bar) and "0/10" in _render(bar)
    path.write_text(json.dumps(train_record(step=4, loss_scale=1024.0, skipped_steps=1)) + "\n")
    bar.update({0: Beat(0, 5, time.time(), os.getpid(), "step"), 1: Beat(1, 4, time.time(), 1, "step")})
    text = _render(bar)
    assert "train" in text and " 5/10 " in text  # the heartbeat is ahead of the last record
    assert "loss 2.5000 | scale 1024 | skipped 1 | 1,234.5 samples/s | eta 0:02" in text


def _plan(tmp_path: Path, progress_on: bool = True) -> Plan:
    raw = {
        "name": "t",
        "backend": "accelerate",
        "model": {"name": "tiny-mlp"},
        "train": {"micro_batch_size": 4, "max_steps": 10},
        "launch": {"device": "cpu", "nproc_per_node": 1},
        "precision": {"dtype": "fp32"},
        "logging": {"dir": str(tmp_path), "progress": progress_on},
    }
    return resolve(validate(raw, "test"), Hardware(gpus=(), cpu_count=2))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("tty", "term", "progress_on", "drawn"),
    [
        (True, "xterm", True, True),
        (False, "xterm", True, False),
        (True, "dumb", True, False),
        (True, "xterm", False, False),
    ],
)
def test_the_bar_is_drawn_only_on_an_interactive_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tty: bool, term: str, progress_on: bool, drawn: bool
) -> None:
    for name in ("FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", term)
    monkeypatch.setattr(sys, "stderr", _Terminal() if tty else io.StringIO())
    assert (Bar.for_terminal(_plan(tmp_path, progress_on)) is not None) == drawn


NOISE = [
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "Using /root/.cache/torch_extensions/py311_cpu as PyTorch extensions root...",
    "Loading extension module deepspeed_shm_comm...",
    "Time to load deepspeed_shm_comm op: 0.0521 seconds",
]


KEPT = [
    "training from step 0 to 6",
    "step 3/6 | loss 6.2478 | 128.5 samples/s | eta 0:00",
    "mplaunch: warning: loss scale fell to 1",
    "DeepSpeed deepspeed_shm_comm_op failed to build: see the log",
]


@pytest.mark.parametrize("stderr", [True, False])
def test_the_filter_drops_op_build_notes_and_keeps_worker_lines(stderr: bool) -> None:
    noise = TorchrunFilter(stderr)
    assert [line for line in NOISE + KEPT if noise.keep(line + "\n")] == KEPT


def test_a_traceback_on_stdout_does_not_silence_the_rest() -> None:
    noise = TorchrunFilter(stderr=False)
    assert noise.keep("Traceback (most recent call last):\n")
    assert noise.keep("finished 6 steps\n")
