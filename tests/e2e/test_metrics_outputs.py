"""What a real tiny run leaves behind: metrics.jsonl fields, TensorBoard scalars, `mplaunch report`
on a finished and on a SIGKILLed run, and the FLOPs it records.

Two real 2-rank CPU runs of recipes/bert_tiny.yaml (fp32), shared by the tests of this module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.plan.estimate import flops
from launcher.recipe.schema import Model
from launcher.recipe.shapes import shape_of
from launcher.run.launch import child_pids

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "bert_tiny.yaml")
STEPS, EVERY, EVAL_EVERY = 12, 2, 6
PLOTS = ("loss.png", "lr.png", "throughput.png", "precision.png")
TRAIN_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "step": (int,),
    "time": (float,),
    "loss": (float,),
    "lr": (float,),
    "loss_scale": (float, type(None)),
    "skipped_steps": (int,),
    "grad_norm": (float, type(None)),
    "samples_per_s": (float,),
    "tokens_per_s": (float,),
    "step_time_s": (float,),
    "flops_per_step": (float, type(None)),
    "tflops": (float, type(None)),
    "mfu": (float, type(None)),
    "mem_peak_bytes": (int, type(None)),
    "mem_reserved_bytes": (int, type(None)),
    "mem_peak_bytes_max": (int, type(None)),
    "mem_reserved_bytes_max": (int, type(None)),
    "data_wait_frac": (float, int),
    "overflow_rate": (float, int),
    "epoch": (int,),
}
EVENTS = {"start", "resume", "ready", "checkpoint", "overflow", "warning", "stop", "finish", "error"}
# TensorBoard tags the Meter writes for a CPU fp32 run (null fields such as loss_scale and mfu are left out).
TB_TAGS = {
    "train/loss",
    "train/lr",
    "train/skipped_steps",
    "train/grad_norm",
    "train/samples_per_s",
    "train/tokens_per_s",
    "train/step_time_s",
    "train/tflops",
    "train/data_wait_frac",
    "train/overflow_rate",
    "eval/eval_loss",
    "eval/eval_perplexity",  # a language model's task metric
    "precision/max_lost",  # the step-1 x-ray's worst layers (fp32: no fp16 range measures)
    "precision/max_stale",
}

pytestmark = pytest.mark.slow


def mplaunch(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def summary_rows(stdout: str) -> dict[str, str]:
    return {line[:18].strip(): line[18:].strip() for line in stdout.splitlines() if len(line) > 18}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert len(data) > 12_000, f"{path.name} is only {len(data)} bytes: an empty figure"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    out = mplaunch(
        TINY,
        f"train.max_steps={STEPS}",
        f"logging.every_steps={EVERY}",
        f"train.eval_every={EVAL_EVERY}",
        "train.eval_steps=2",
        "checkpoint.every_steps=6",
        f"logging.dir={root}",
        "name=finished",
    )
    assert out.returncode == 0, out.stderr
    return root / "finished"


def test_metrics_jsonl_has_the_documented_fields(finished: Path) -> None:
    train = records(finished, "train")
    assert [r["step"] for r in train] == [1, *range(EVERY, STEPS + 1, EVERY)]
    for r in train:
        for field, types in TRAIN_FIELDS.items():
            assert field in r, f"step {r['step']}: no {field}"
            assert isinstance(r[field], types), f"step {r['step']}: {field}={r[field]!r}"
        assert math.isfinite(r["loss"])
        assert r["loss_scale"] is None
        assert r["mfu"] is None
        assert r["skipped_steps"] == 0
        assert r["overflow_rate"] == 0
        assert 0 <= r["data_wait_frac"] <= 1
        assert r["samples_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 64)
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 2 / 1e12)
    assert [r["step"] for r in records(finished, "eval")] == [6, 12]
    assert all(math.isfinite(r["eval_loss"]) for r in records(finished, "eval"))
    for r in records(finished, "eval"):  # token-weighted across ranks, with the task's metric
        assert r["eval_labels"] > 0
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    events = records(finished, "event")
    assert {e["event"] for e in events} <= EVENTS
    assert all(isinstance(e["message"], str) and isinstance(e["time"], float) for e in events)
    assert [e["event"] for e in events if e["event"] != "checkpoint"] == ["start", "ready", "finish"]
    ready = next(e for e in events if e["event"] == "ready")
    assert ready["step"] == 1
    assert list(ready["seconds"]) == ["start", "data", "model", "backend", "restore", "first step"]
    assert all(s >= 0 for s in ready["seconds"].values())
    assert ready["message"].startswith("step 1 done ")
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [6, 12]


def test_tensorboard_event_files_hold_the_scalars(finished: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(finished / "tb"))
    tb.Reload()
    assert set(tb.Tags()["scalars"]) == TB_TAGS
    for r in records(finished, "train"):
        logged = {e.step: e.value for e in tb.Scalars("train/loss")}
        assert logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # stored as float32
    assert [e.step for e in tb.Scalars("eval/eval_loss")] == [6, 12]
    assert [e.step for e in tb.Scalars("train/lr")] == [1, *range(EVERY, STEPS + 1, EVERY)]
    (xray,) = records(finished, "precision")
    worst = max(row["lost"] for row in xray["layers"].values() if row["lost"] is not None)
    assert [(e.step, e.value) for e in tb.Scalars("precision/max_lost")] == [
        (1, pytest.approx(worst, rel=1e-6))
    ]


def test_report_on_a_finished_run(finished: Path, tmp_path: Path) -> None:
    out = mplaunch("report", str(finished), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for name in PLOTS:
        assert_png(tmp_path / name)
    rows = summary_rows(out.stdout)
    assert rows["state"] == "finished"
    assert rows["steps"] == f"{STEPS} of {STEPS}"
    assert rows["final loss"] == f"{records(finished, 'train')[-1]['loss']:.4f}"
    assert rows["checkpoints"].startswith("2 (latest step 12)")


def test_flops_per_step_is_the_formula_for_the_run_shape(finished: Path) -> None:
    from tokenizers import Tokenizer

    plan = json.loads((finished / "plan.json").read_text())
    vocab = Tokenizer.from_file(str(finished / "tokenizer" / "tokenizer.json")).get_vocab_size()
    shape = shape_of(Model.model_validate(plan["recipe"]["model"]), vocab_size=vocab)
    assert plan["plan"]["vocab_size"] == vocab  # the launcher knew the trained tokenizer's size
    seq, batch = plan["recipe"]["data"]["seq_len"], plan["plan"]["batch"]["global_batch_size"]
    expected = flops.flops_per_step(shape, seq, batch)
    assert {r["flops_per_step"] for r in records(finished, "train")} == {expected}
    # By hand, tiny BERT (h 128, 2 layers, FFN 512): 6 * matmul weights * tokens + attention, per sample.
    h, layers, ffn = 128, 2, 512
    weights = layers * (4 * h * h + 2 * h * ffn) + h * h + h * vocab
    assert expected == (6 * weights * seq + 12 * layers * seq**2 * h) * batch


def _descendants(pid: int) -> list[int]:
    kids = child_pids(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def test_report_on_a_run_killed_midway(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            TINY,
            "train.max_steps=200",
            "logging.every_steps=1",
            f"logging.dir={tmp_path}",
            "name=killed",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file() or len(records(run_dir, "train")) < 3:
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no metrics after 300 s"
            time.sleep(0.5)
    finally:
        # torchrun and each worker run in sessions of their own, so the launcher's process
        # group alone is not the whole run: SIGKILL every process of it, as the OOM killer might.
        workers = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (run_dir / "FINISHED").exists()
    out = mplaunch("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    for name in PLOTS:
        assert_png(tmp_path / "report" / name)
    rows = summary_rows(out.stdout)
    step = int(rows["steps"].split()[0])
    assert 3 <= step < 200
    assert rows["steps"] == f"{step} of 200"
    # Killed seconds ago with no error event: it cannot be told from a live run yet.
    assert rows["state"].split()[0] in ("running", "crashed")
