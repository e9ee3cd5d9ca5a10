"""`mplaunch report` on synthetic run directories: finished, fp16 overflows, crashed, resumed, bf16/CPU."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.analysis.plots import plot_loss
from launcher.analysis.report import summarize
from launcher.rundir.metrics_log import Metrics, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "lr.png", "loss_scale.png", "throughput.png", "memory.png", "precision.png")
T0 = 1_700_000_000.0
STEP_S = 2.0


def train(step: int, **fields: Any) -> dict[str, Any]:
    """A train record with plausible fp16-on-GPU values; `fields` override them (None for null)."""
    record = {
        "kind": "train",
        "step": step,
        "time": T0 + step * STEP_S,
        "loss": 8.0 * math.exp(-step / 40) + 2.0,
        "lr": 1e-4 * min(1.0, step / 20),
        "loss_scale": 65536.0,
        "skipped_steps": 0,
        "grad_norm": 1.5,
        "samples_per_s": 1200.0 + (step % 7) * 10,
        "tokens_per_s": (1200.0 + (step % 7) * 10) * 128,
        "step_time_s": 0.2,
        "flops_per_step": 1e15,
        "tflops": 180.0,
        "mfu": 0.40 + (step // 10 % 5) * 0.01,
        "mem_peak_bytes": 20 * 2**30 + step * 2**20,
        "mem_reserved_bytes": 24 * 2**30,
        "data_wait_frac": 0.02,
        "overflow_rate": 0.0,
        "epoch": 0,
    }
    record.update(fields)
    return record


def event(step: int, name: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "event",
        "step": step,
        "time": T0 + step * STEP_S,
        "event": name,
        "message": name,
        **fields,
    }


def evaluation(step: int, loss: float) -> dict[str, Any]:
    return {"kind": "eval", "step": step, "time": T0 + step * STEP_S + 1, "eval_loss": loss}


def make_run(
    root: Path,
    records: list[dict[str, Any]],
    *,
    max_steps: int | None = 100,
    finished: bool = False,
    checkpoints: tuple[int, ...] = (),
    tail: str = "",
    dtype: str = "fp16",
) -> Path:
    """A run directory as a worker leaves it; `tail` is appended raw (a half-written line)."""
    run = root / "run"
    run.mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + tail)
    if max_steps is not None:
        recipe = {"name": "tiny", "train": {"max_steps": max_steps}}
        device = "cpu" if dtype == "bf16" else "cuda"
        plan = {
            "recipe": recipe,
            "plan": {"device": device, "precision": {"dtype": dtype, "reason": "recipe"}},
        }
        (run / "plan.json").write_text(json.dumps(plan))
    for step in checkpoints:
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text(json.dumps({"step": step}))
    if finished:
        (run / "FINISHED").write_text(json.dumps({"step": max_steps, "time": T0}))
    return run


def finished_records() -> list[dict[str, Any]]:
    records = [event(0, "start")]
    for step in range(10, 101, 10):
        records.append(train(step))
        if step % 50 == 0:
            records += [
                evaluation(step, 2.5 if step == 50 else 2.3),
                event(step, "checkpoint", path=f"step-{step}"),
            ]
    return [*records, event(100, "finish")]


def fp16_overflow_records() -> list[dict[str, Any]]:
    records, scale, skipped = [event(0, "start")], 2.0**16, 0
    for step in range(1, 101):
        if step in (3, 4, 5, 41, 77):
            scale /= 2
            skipped += 1
            records.append(event(step, "overflow", loss_scale=scale))
        elif step % 25 == 0:
            scale *= 2
        if step % 5 == 0:
            records.append(train(step, loss_scale=scale, skipped_steps=skipped))
    return records


def bf16_cpu_records() -> list[dict[str, Any]]:
    nulls = dict(
        loss_scale=None,
        mfu=None,
        tflops=None,
        flops_per_step=None,
        mem_peak_bytes=None,
        mem_reserved_bytes=None,
        samples_per_s=3.2,
        tokens_per_s=None,
    )
    return [event(0, "start"), *(train(s, **nulls) for s in range(5, 41, 5))]


def resumed_records() -> list[dict[str, Any]]:
    first = [
        event(0, "start"),
        *(train(s, loss=9.0) for s in range(10, 71, 10)),
        event(70, "error", message="x"),
    ]
    second = [event(50, "resume", from_step=50), *(train(s, loss=1.0 + s / 1000) for s in range(60, 101, 10))]
    return first + second


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    # A blank 880x495 figure is about 3 KB and one with empty axes about 10 KB; a note or curves add more.
    assert len(data) > 12_000, f"{path.name} is only {len(data)} bytes"
    return struct.unpack(">II", data[16:24])


def report(run: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, str]:
    """Run `mplaunch report` and return its summary rows; stderr is kept under the key "stderr"."""
    assert cli.main(["report", str(run), *extra]) == 0
    captured = capsys.readouterr()
    rows = {line[:18].strip(): line[18:].strip() for line in captured.out.splitlines() if len(line) > 18}
    return {**rows, "stderr": captured.err}


def test_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, finished_records(), finished=True, checkpoints=(50, 100))
    rows = report(run, capsys)
    sizes = {name: png_size(run / "report" / name) for name in PLOTS}
    assert sizes == {**dict.fromkeys(PLOTS, (880, 495)), "throughput.png": (880, 605)}  # MFU panel below
    assert rows["state"] == "finished"
    assert rows["steps"] == "100 of 100"
    assert rows["final loss"] == f"{train(100)['loss']:.4f}"
    assert rows["best eval loss"] == "2.3000 at step 100"
    assert rows["checkpoints"] == "2 (latest step 100)"
    assert rows["skipped steps"] == "0"
    assert rows["wall time"] == "3m 21s from the first record to finish"  # no "ready" event
    assert rows["median MFU"] == "42.0%"


@pytest.mark.parametrize("overflow_events", [True, False])
def test_fp16_overflows_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overflow_events: bool
) -> None:
    records = [r for r in fp16_overflow_records() if overflow_events or r.get("event") != "overflow"]
    run = make_run(tmp_path, records, finished=True)
    rows = report(run, capsys, "--out", str(tmp_path / "plots"))
    assert rows["skipped steps"] == "5"
    assert rows["overflow rate"] == "5.0% of 100 steps"
    assert len(read_metrics(run).named("overflow")) == (5 if overflow_events else 0)
    png_size(tmp_path / "plots" / "loss_scale.png")
    assert not (run / "report").exists()


def test_crashed_run_with_truncated_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        event(0, "start"),
        *(train(s) for s in range(10, 61, 10)),
        event(63, "error", message="CUDA OOM\nboom"),
    ]
    run = make_run(tmp_path, records, tail='{"kind": "train", "step": 70, "lo')
    rows = report(run, capsys)
    assert rows["state"] == "crashed (at step 63: boom)"
    assert rows["steps"] == "60 of 100"
    assert rows["final loss"] == f"{train(60)['loss']:.4f}"
    assert "skipped 1 unreadable line" in rows["stderr"]
    for name in PLOTS:
        png_size(run / "report" / name)


@pytest.mark.parametrize(("age_s", "state"), [(30.0, "running"), (3600.0, "crashed")])
def test_silent_run_is_running_until_stale(tmp_path: Path, age_s: float, state: str) -> None:
    run = make_run(tmp_path, [event(0, "start"), train(10), train(20)], tail='{"kind": "tr')
    metrics = read_metrics(run)
    assert metrics.bad_lines == 1
    assert summarize(run, metrics, now=T0 + 20 * STEP_S + age_s).state == state


def test_resume_keeps_latest_record_per_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, resumed_records(), max_steps=None)
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics.train] == list(range(10, 101, 10))
    assert [r["loss"] for r in metrics.train] == [9.0] * 5 + [1.06, 1.07, 1.08, 1.09, 1.1]
    assert metrics.resumes == (50,)
    rows = report(run, capsys)
    assert rows["steps"] == "100 of ?"  # no plan.json: copied without it
    assert rows["run"] == "run"
    assert rows["final loss"] == "1.1000"
    assert rows["state"].startswith("crashed (no FINISHED file")  # the error came before the resume


def test_restart_without_resume_event_is_still_marked(tmp_path: Path) -> None:
    run = make_run(tmp_path, [train(10), train(20), train(30), train(20, loss=0.5), train(30)])
    metrics = read_metrics(run)
    assert metrics.resumes == (20,)
    assert metrics.series("loss")[1][1] == 0.5


def test_bf16_cpu_run_without_scale_mfu_or_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, bf16_cpu_records(), max_steps=40, finished=True, dtype="bf16")
    rows = report(run, capsys)
    assert rows["run"] == "tiny · bf16 · cpu"
    assert rows["median MFU"] == "n/a"
    assert rows["median samples/s"] == "3.2"
    assert rows["checkpoints"] == "none"
    drawn = [name for name in PLOTS if name not in ("loss_scale.png", "memory.png")]  # nothing to draw
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(drawn)
    for name in drawn:
        assert png_size(run / "report" / name) == (880, 495)


def test_overlay_of_two_runs(tmp_path: Path) -> None:
    a = read_metrics(make_run(tmp_path, finished_records()))
    b = Metrics(
        train=tuple(train(s, loss=train(s)["loss"] * 1.05) for s in range(10, 101, 10)),
        eval=(),
        events=(),
        resumes=(40,),
    )
    assert plot_loss({"fp32": a, "bf16": b}, tmp_path / "parity.png", title="fp32 vs bf16").is_file()
    png_size(tmp_path / "parity.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such run directory"),
        ("", "empty"),
        ("garbage\n", "no records yet"),
        ("no file", "no metrics.jsonl"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
    if content not in (None, "no file"):
        (run / "metrics.jsonl").write_text(content)
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path, finished_records())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ".[report]" in err


def test_report_does_not_import_torch(tmp_path: Path) -> None:
    run = make_run(tmp_path, finished_records(), finished=True)
    code = (
        "import sys, launcher.cli as c; rc = c.main(['report', sys.argv[1]]);"
        " print(rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 False False"
    assert (run / "report" / "loss.png").is_file()


def test_live_run_is_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    records = [dict(r, time=now - 100 + r["step"]) for r in [event(0, "start"), train(10), train(20)]]
    run = make_run(tmp_path, records, tail='{"kind"')
    assert report(run, capsys)["state"].startswith("running (last record")


def test_a_recent_run_nobody_holds_is_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lock tells: a free RUN_DIR/.lock means no process runs it, however fresh its records."""
    from launcher.rundir.lock import RunLock

    now = time.time()
    records = [dict(r, time=now - 100 + r["step"]) for r in [event(0, "start"), train(10), train(20)]]
    run = make_run(tmp_path, records)
    with RunLock.acquire(run / ".lock"):
        assert report(run, capsys)["state"].startswith("running (last record")
    state = report(run, capsys)["state"]
    assert state.startswith("crashed (no FINISHED file, no process holds its .lock"), state
    assert "last record at step 20" in state


def xray(step: int, rows: dict[str, dict[str, Any]], scale: float | None = 2.0**16) -> dict[str, Any]:
    return {"kind": "precision", "step": step, "time": T0 + step * STEP_S, "loss_scale": scale,
            "skipped": False, "lr": 1e-4, "layers": rows}  # fmt: skip


def fp16_row(underflow: float, headroom: float | None, zero: float = 0.0) -> dict[str, Any]:
    return {"elements": 64, "zero": zero, "underflow": underflow, "to_zero": 0.0, "near_max": 0.0,
            "headroom_log2": headroom, "lost": 0.0, "stale": 0.3}  # fmt: skip


def test_precision_xray_heatmaps_with_the_loss_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = [f"lm.bert.encoder.layer.{i}.dense" for i in range(30)]
    records = [event(0, "start"), *(train(s) for s in range(10, 101, 10))]
    records += [
        xray(s, {n: fp16_row(0.9 if s == 50 else 0.0, 8.0) for n in layers}) for s in range(25, 101, 25)
    ]
    records.append(event(50, "underflow", layers={layers[0]: 0.9}))
    run = make_run(tmp_path, records)
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics.precision] == [25, 50, 75, 100]
    cli.main(["report", str(run)])
    assert "4 x-rays; warnings name 1 layer (lm.bert.encoder.layer.0.dense)" in capsys.readouterr().out
    width, height = png_size(run / "report" / "precision.png")
    assert width == 880
    assert height > 495 * 2  # two 30-row heatmaps and the loss-scale curve
    (tmp_path / "few").mkdir()
    few = make_run(tmp_path / "few", [xray(25, {"a.w": fp16_row(0.0, 8.0)}, scale=None)], dtype="bf16")
    cli.main(["report", str(few)])
    assert png_size(few / "report" / "precision.png")[1] < height  # bf16: two one-row maps, no scale


def test_precision_cells_and_labels() -> None:
    from launcher.analysis.plots import _cell, cell_edges, short_names

    assert short_names(["lm.bert.a.q", "lm.bert.b", "lm.cls"]) == ["bert.a.q", "bert.b", "cls"]
    assert short_names(["only.one"]) == ["only.one"]
    assert cell_edges([5, 10, 20], 20) == [2.5, 7.5, 15.0, 20.0]  # within the run's steps 0 to 20
    assert cell_edges([1, 50, 100, 150], 150) == [0.0, 25.5, 75.0, 125.0, 150.0]
    assert cell_edges([1], 300) == [0.0, 4.0]  # a lone x-ray: a 50th of the axis
    assert _cell(fp16_row(0.2, 3.0), "underflow") == 0.2
    assert _cell(fp16_row(0.0, None, zero=1.0), "underflow") == 1.0  # all zero: flushed
    assert math.isnan(_cell(fp16_row(0.0, None), "headroom_log2"))
    assert math.isnan(_cell(None, "lost"))
