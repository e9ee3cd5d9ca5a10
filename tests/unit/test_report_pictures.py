"""What `mplaunch report`'s pictures and summary show a user: the LR of every step from step 1, the
x-ray heatmaps within the run's steps, no empty placeholder plots, and the wall time from launch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.analysis import figure, plots
from launcher.analysis import report as reports
from launcher.analysis.report import summarize
from launcher.plan import schedule
from launcher.recipe.sections import Recipe
from launcher.rundir.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SCHEDULE = {"optimizer": {"lr": 1e-3}, "scheduler": {"warmup_steps": 10}, "train": {"max_steps": 30}}
PLOTS = ("loss.png", "lr.png", "loss_scale.png", "throughput.png", "memory.png", "precision.png")
T0 = 1_700_000_000.0


def train(step: int, **fields: Any) -> dict[str, Any]:
    """A train record of an fp16 GPU run (every field the plots read); `fields` override it."""
    record = {"kind": "train", "step": step, "time": T0 + 2.0 * step, "loss": 9.0 - step / 100, "lr": 1e-4,
              "loss_scale": 65536.0, "skipped_steps": 0, "samples_per_s": 1200.0, "tokens_per_s": 153600.0,
              "step_time_s": 0.2, "mfu": 0.4, "mem_peak_bytes": 2**34, "mem_reserved_bytes": 2**35}  # fmt: skip
    return {**record, **fields}


def event(step: int, name: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "event", "step": step, "time": T0 + 2.0 * step, "event": name, "message": name, **fields}


def xray(step: int, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "precision", "step": step, "time": T0 + 2.0 * step, "loss_scale": 2.0**16,
            "skipped": False, "lr": 1e-4, "layers": rows}  # fmt: skip


def fp16_row() -> dict[str, Any]:
    return {"elements": 64, "zero": 0.0, "underflow": 0.0, "to_zero": 0.0, "near_max": 0.0,
            "headroom_log2": 8.0, "lost": 0.0, "stale": 0.3}  # fmt: skip


def make_run(
    root: Path,
    records: list[dict[str, Any]],
    *,
    max_steps: int = 100,
    finished: bool = False,
    dtype: str = "fp16",
) -> Path:
    """A run directory as the workers leave it: metrics.jsonl, plan.json (on a GPU unless bf16)."""
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    device = "cpu" if dtype == "bf16" else "cuda"
    plan = {"recipe": {"name": "tiny", "train": {"max_steps": max_steps}},
            "plan": {"device": device, "precision": {"dtype": dtype}}}  # fmt: skip
    (run / "plan.json").write_text(json.dumps(plan))
    if finished:
        (run / "FINISHED").write_text(json.dumps({"step": max_steps, "time": T0}))
    return run


def report(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """`mplaunch report RUN_DIR`'s summary rows."""
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    return {line[:18].strip(): line[18:].strip() for line in out.splitlines() if len(line) > 18}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def with_schedule(run: Path, **sections: Any) -> Path:
    """Give the run's plan.json a recipe with an LR schedule (linear, 10 warmup steps, 30 steps)."""
    data = json.loads((run / "plan.json").read_text())
    data["recipe"].update(json.loads(json.dumps(SCHEDULE)))
    for name, values in sections.items():
        data["recipe"][name].update(values)
    (run / "plan.json").write_text(json.dumps(data))
    return run


def lr_of(**sections: Any) -> Any:
    recipe = Recipe.model_validate({"name": "x", **SCHEDULE, **sections})
    return lambda n: schedule.lr_at(recipe, n)


def drawn_axes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The axes of each figure as figure.finish saves it, by file name."""
    seen: dict[str, list[Any]] = {}
    finish = figure.finish

    def spy(fig: Any, axes: list[Any], path: Path, *args: Any, **kwargs: Any) -> Path:
        seen[path.name] = axes
        return finish(fig, axes, path, *args, **kwargs)

    monkeypatch.setattr(figure, "finish", spy)
    return seen


# ---------------------------------------------------------------------------- the LR of every step


def test_the_lr_curve_holds_every_step_from_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logged every 10 steps, the warmup of 10 steps is drawn step by step from step 1."""
    at = lr_of()
    records = [event(0, "start"), *(train(s, lr=at(s - 1)) for s in (10, 20, 30))]
    run = with_schedule(make_run(tmp_path, records, max_steps=30, finished=True, dtype="bf16"))
    axes = drawn_axes(monkeypatch)
    report(run, capsys)
    curve = axes["lr.png"][0].lines[0]
    assert list(curve.get_xdata()) == list(range(1, 31))
    assert list(curve.get_ydata()) == pytest.approx([at(n) for n in range(30)])
    assert curve.get_ydata()[0] == pytest.approx(1e-3 / 11)  # step 1: lr/(W+1), the warmup's first
    assert max(curve.get_ydata()) == pytest.approx(1e-3)  # step 11


def test_skipped_fp16_steps_hold_the_lr(tmp_path: Path) -> None:
    """A skipped step does not advance the schedule: the steps after it use the LR one step behind."""
    at = lr_of()
    applied = {s: s - 1 - (s > 4) for s in range(1, 21)}  # step 4 overflowed and was skipped
    records = [event(4, "overflow", loss_scale=2.0**15), *(train(s, lr=at(applied[s])) for s in (1, 10, 20))]
    metrics = read_metrics(make_run(tmp_path, records))
    steps, lr = plots.lr_curve(metrics, at)
    assert steps == list(range(1, 21))
    assert lr == pytest.approx([at(applied[s]) for s in steps])
    assert lr[3] == lr[4]  # steps 4 and 5 both used the LR after 3 applied steps


def test_a_schedule_changed_on_resume_is_drawn_from_the_resume(tmp_path: Path) -> None:
    """plan.json holds the latest launch's schedule: the steps before the resume, logged under
    another one, keep their logged values only."""
    old, new = lr_of(), lr_of(optimizer={"lr": 2e-3})
    records = [
        *(train(s, lr=old(s - 1)) for s in (1, 10)),
        event(10, "resume", from_step=10),
        *(train(s, lr=new(s - 1)) for s in (20, 30)),
    ]
    steps, lr = plots.lr_curve(read_metrics(make_run(tmp_path, records)), new)
    assert steps == list(range(11, 31))
    assert lr == pytest.approx([new(s - 1) for s in steps])
    # Logged values no schedule explains (an older run, unknown skips): no curve, the records alone.
    odd = [train(s, lr=1.0) for s in (10, 20)]
    (tmp_path / "odd").mkdir()
    assert plots.lr_curve(read_metrics(make_run(tmp_path / "odd", odd)), new) == ([], [])


def test_the_schedule_is_read_from_the_run_directory(tmp_path: Path) -> None:
    run = with_schedule(make_run(tmp_path, [train(10)]))
    at = reports.lr_schedule(run)
    assert at is not None
    assert at(0) == pytest.approx(1e-3 / 11)
    assert at(10) == pytest.approx(1e-3)
    (run / "plan.json").unlink()  # a copy without plan.json or recipe.yaml: the records alone
    assert reports.lr_schedule(run) is None


# ---------------------------------------------------------------------------- precision x-ray axis


@pytest.mark.parametrize(
    ("xrays", "last"),
    [((1, 50, 100, 150), 150), ((1,), 30), ((1, 10, 20, 30), 30), ((50, 100), 120)],
)
def test_the_xray_heatmaps_lie_within_the_run_steps(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    xrays: tuple[int, ...],
    last: int,
) -> None:
    """The x-axis is the run's steps (0 to the last), and no cell reaches outside it."""
    rows = {f"lm.layer.{i}": fp16_row() for i in range(3)}
    records = [*(train(s) for s in range(10, last + 1, 10)), *(xray(s, rows) for s in xrays)]
    run = make_run(tmp_path, records, max_steps=last)
    axes = drawn_axes(monkeypatch)
    report(run, capsys)
    for ax in axes["precision.png"]:
        assert ax.get_xlim() == (0.0, float(last))
    for mesh in axes["precision.png"][0].collections:
        xs = mesh.get_coordinates()[..., 0]
        assert xs.min() >= 0.0
        assert xs.max() <= last
        widths = sorted({round(float(b - a), 6) for a, b in zip(xs[0], xs[0][1:], strict=False)})
        gaps = [b - a for a, b in zip(xrays, xrays[1:], strict=False)] or [max(1.0, last / 50)]
        assert widths[-1] <= max(gaps) + 1e-6  # no cell wider than the spacing of the x-rays


# ---------------------------------------------------------------------------- left-out plots


def test_a_cpu_bf16_run_has_no_placeholder_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nulls = {"loss_scale": None, "mem_peak_bytes": None, "mem_reserved_bytes": None, "mfu": None}
    run = make_run(tmp_path, [train(s, **nulls) for s in (1, 10, 20)], max_steps=20, dtype="bf16")
    rows = report(run, capsys)
    written = sorted(p.name for p in (run / "report").iterdir())
    assert written == ["loss.png", "lr.png", "precision.png", "throughput.png"]
    assert rows["not plotted"] == (
        "no loss scale: bf16 needs none; no memory curve: CPU runs record no device memory"
    )


def test_an_fp16_gpu_run_keeps_its_plots_before_its_first_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that will record a loss scale and memory shows their plots (with a note) from the start."""
    run = make_run(tmp_path, [event(0, "start")], dtype="fp16")
    rows = report(run, capsys)
    assert all(is_png(run / "report" / name) for name in PLOTS)
    assert "not plotted" not in rows


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("fp32", "cuda", {"loss_scale.png": "no loss scale: fp32 needs none"}),
        ("fp16", "cpu", {"memory.png": "no memory curve: CPU runs record no device memory"}),
        (
            None,
            None,
            {
                "loss_scale.png": "no loss scale: none recorded",
                "memory.png": "no memory curve: none recorded",
            },
        ),
    ],
)
def test_which_plots_are_left_out(
    tmp_path: Path, dtype: str | None, device: str | None, expected: dict[str, str]
) -> None:
    metrics = read_metrics(
        make_run(tmp_path, [train(1, loss_scale=None, mem_peak_bytes=None, mem_reserved_bytes=None)])
    )
    assert plots.left_out(metrics, dtype, device) == expected


# ---------------------------------------------------------------------------- wall time and setup


def ready(step: int, at: float, **seconds: float) -> dict[str, Any]:
    return {**event(step, "ready", seconds=seconds), "time": at}


def test_the_wall_time_runs_from_launch_and_names_the_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Launch (env.json) at T0 - 25, workers up at T0 - 22, step 1 begins at T0 - 1: setup 24 s of a 247 s run."""
    phases = {"start": 6.0, "data": 1.0, "model": 9.0, "backend": 5.0, "restore": 0.0, "first step": 1.0}
    records = [
        event(0, "start") | {"time": T0 - 1.0},
        ready(1, T0, **phases),
        *(train(s) for s in range(10, 101, 10)),
        event(100, "finish") | {"time": T0 + 222.0},
    ]
    run = make_run(tmp_path, records, finished=True)
    (run / "env.json").write_text(json.dumps({"python": "3.11", "time": T0 - 25.0}))
    rows = report(run, capsys)
    assert rows["wall time"] == "4m 07s from launch to finish"
    assert rows["setup"] == (
        "24s before step 1 (launcher 3.0s, start 6.0s, data 1.0s, model 9.0s, backend 5.0s, restore 0.0s)"
    )
    # A Slurm job's run directory was prepared at submission: its workers' start is the launch known.
    (run / "slurm").mkdir()
    (run / "slurm" / "job.sbatch").write_text("#!/bin/bash\n")
    rows = report(run, capsys)
    assert rows["wall time"] == "4m 04s from the workers' start to finish"
    assert rows["setup"].startswith("21s before step 1 (start 6.0s,")


def test_a_resumed_run_sums_the_setup_of_its_launches(tmp_path: Path) -> None:
    phases = {"start": 5.0, "model": 4.0, "first step": 1.0}
    records = [
        ready(1, T0, **phases),
        *(train(s) for s in (10, 20)),
        event(20, "resume", from_step=20),
        ready(21, T0 + 500.0, **phases),
        train(30, time=T0 + 600.0),
    ]
    run = make_run(tmp_path, records)
    summary = summarize(run, read_metrics(run))
    assert summary.setup is not None
    assert (summary.setup.seconds, summary.setup.launches) == (pytest.approx(18.0), 2)
    assert summary.wall_s == pytest.approx(610.0)  # the first workers' start (T0 - 10) to the last record
    assert dict(summary.rows())["setup"] == "18s before the first step, over 2 launches"


def test_a_run_without_a_ready_event_counts_from_its_first_record(tmp_path: Path) -> None:
    run = make_run(tmp_path, [event(0, "start"), train(10), train(20)])
    rows = dict(summarize(run, read_metrics(run), now=T0).rows())
    assert rows["wall time"] == "40s from the first record to the last record"
    assert rows["setup"] == "n/a"


# ---------------------------------------------------------------------------- exported models


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_exported_models_are_not_in_git_status() -> None:
    """The README's `mplaunch export RUN_DIR --out exported/NAME` writes under ./exported."""
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "exported/bert-tiny/model.safetensors"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
