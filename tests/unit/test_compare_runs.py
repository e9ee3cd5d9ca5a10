"""`mplaunch compare` on synthetic run directories: which runs, their differing keys and labels,
the table's numbers and states, the best run, sweep order, errors, and the files written."""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.analysis import compare_runs_plots, figure
from launcher.analysis.compare_runs import compare, find_runs
from launcher.analysis.compare_runs_rows import Row, Run, differing_keys
from launcher.recipe.schema import flatten
from launcher.errors import UserError, report
from launcher.rundir.metrics_log import read_metrics

T0 = 1_700_000_000.0
RECIPE: dict[str, Any] = {
    "name": "base",
    "model": {"name": "tiny-mlp"},
    "optimizer": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999]},
    "train": {"micro_batch_size": 4, "max_steps": 4, "seed": 1234},
    "checkpoint": {"dir": None},
    "logging": {"dir": "runs"},
}


def train(step: int, **fields: Any) -> dict[str, Any]:
    record = {
        "kind": "train",
        "step": step,
        "time": T0 + step,
        "loss": 5.0 - step * 0.5,
        "lr": 0.001,
        "loss_scale": None,
        "skipped_steps": 0,
        "tokens_per_s": 1000.0 * step,
        "mfu": None,
        "mem_peak_bytes_max": None,
    }
    return {**record, **fields}


def event(step: int, name: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "event", "step": step, "time": T0 + step, "event": name, "message": name, **fields}


def evaluation(step: int, loss: float) -> dict[str, Any]:
    return {"kind": "eval", "step": step, "time": T0 + step, "eval_loss": loss}


def make_run(
    path: Path,
    records: list[dict[str, Any]] | None = None,
    finished: bool = True,
    **changes: Any,
) -> Path:
    """A run directory as a launch leaves it: recipe.yaml (RECIPE, `changes` by a__b keys), metrics.jsonl,
    FINISHED."""
    path.mkdir(parents=True)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["name"], recipe["logging"]["dir"] = path.name, str(path.parent)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    records = [train(s) for s in range(1, 5)] if records is None else records
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (path / "FINISHED").write_text(json.dumps({"step": 4, "time": T0}) + "\n")
    return path


def rows_by_name(out: Path) -> dict[str, dict[str, str]]:
    with (out / "compare.csv").open() as f:
        return {row["name"]: row for row in csv.DictReader(f)}


# ---------------------------------------------------------------- differing keys and labels


def test_flatten_keeps_lists_and_empty_mappings_as_values() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "a.d": {},
        "e": None,
    }


def test_differing_keys_leave_out_what_each_run_has_of_its_own(tmp_path: Path) -> None:
    def flat(name: str, **values: Any) -> tuple[Run, dict[str, Any]]:
        base = {
            "name": name,
            "logging.dir": f"/sweeps/{name}-parent",
            "source": f"/recipes/{name}.yaml",
            "checkpoint.dir": f"/ckpt/{name}",
            "optimizer.lr": 0.001,
            "optimizer.betas": [0.9, 0.999],
            "train.seed": 1,
        }
        return Run(tmp_path / name), {**base, **values}

    recipes = [flat("a"), flat("b", **{"optimizer.betas": [0.9, 0.95]}), flat("c", **{"train.seed": 2})]
    assert differing_keys(recipes) == ["optimizer.betas", "train.seed"]
    # A checkpoint directory shared by the runs (not derived from each one) is a real difference.
    shared = [flat("a"), flat("b", **{"checkpoint.dir": "/elsewhere"})]
    assert differing_keys(shared) == ["checkpoint.dir"]


def test_labels_name_the_differing_keys_and_the_csv_holds_their_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "runs" / "a", optimizer__lr=0.001, train__global_batch_size=16)
    make_run(tmp_path / "runs" / "b", optimizer__lr=0.01, train__global_batch_size=16)
    make_run(tmp_path / "runs" / "c", optimizer__lr=0.01, train__global_batch_size=32)
    out = tmp_path / "out"
    assert compare([tmp_path / "runs"], out) == 0
    rows = rows_by_name(out)
    assert rows["a"]["label"] == "optimizer.lr=0.001, train.global_batch_size=16"
    assert rows["c"]["label"] == "optimizer.lr=0.01, train.global_batch_size=32"
    assert (rows["b"]["optimizer.lr"], rows["b"]["train.global_batch_size"]) == ("0.01", "16")
    assert (
        "`optimizer.lr` (0.001, 0.01); `train.global_batch_size` (16, 32)" in (out / "compare.md").read_text()
    )
    assert "optimizer.lr=0.001, train.global_batch_size=16" in capsys.readouterr().out


def test_without_differing_keys_the_label_is_the_run_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "one")
    make_run(tmp_path / "two")
    compare([tmp_path / "one", tmp_path / "two"], tmp_path / "out")
    rows = rows_by_name(tmp_path / "out")
    assert (rows["one"]["label"], rows["two"]["label"]) == ("one", "two")
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:3] == ["run", "state", "steps"]  # no "keys" column repeating the names


# ---------------------------------------------------------------- numbers


def test_the_numbers_of_a_row(tmp_path: Path) -> None:
    records = [
        train(1, tokens_per_s=10.0, mfu=0.9, mem_peak_bytes_max=2**30),  # step 1: one-time costs, left out
        train(2, tokens_per_s=100.0, mfu=0.30, mem_peak_bytes_max=3 * 2**30),
        evaluation(2, 4.5),
        event(2, "underflow", layers={"head": 0.5}),
        event(3, "overflow", loss_scale=1024.0),  # not an x-ray warning
        event(3, "warning"),
        train(3, tokens_per_s=300.0, mfu=0.50, skipped_steps=1, mem_peak_bytes_max=2**30),
        event(3, "lost_updates", layers={"embed": 0.2}),
        evaluation(3, 3.5),
        train(4, tokens_per_s=200.0, mfu=0.40, skipped_steps=2, loss=1.25, mem_peak_bytes_max=2**30),
        event(4, "fp8_range", layers={"mid": {}}),
        evaluation(4, 3.75),
    ]
    make_run(tmp_path / "r", records)
    compare([tmp_path / "r"], tmp_path / "out")
    row = rows_by_name(tmp_path / "out")["r"]
    assert float(row["tokens_per_s"]) == 200.0  # median of 100, 300, 200: step 1's 10 left out
    assert float(row["mfu"]) == pytest.approx(0.40)
    assert int(row["peak_mem_bytes"]) == 3 * 2**30
    assert (row["final_loss"], row["final_eval_loss"]) == ("1.25", "3.75")
    assert (row["best_eval_loss"], row["best_eval_step"]) == ("3.5", "3")
    assert (row["skipped_steps"], row["xray_warnings"], row["steps"]) == ("2", "3", "4")
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| 3.5000 (3) |" in table
    assert "| 40.0% |" in table
    assert "| 3.0 GiB |" in table


def test_a_cpu_run_shows_no_mfu_or_memory_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "r")
    compare([tmp_path / "r"], tmp_path / "out")
    out = capsys.readouterr().out
    assert "MFU" not in out.splitlines()[0]
    assert "peak mem" not in out.splitlines()[0]
    assert "not shown (no run recorded them): eval loss, best eval (step), MFU, peak mem, parity" in out
    assert rows_by_name(tmp_path / "out")["r"]["mfu"] == ""


def test_the_best_run_is_marked_by_final_eval_loss_else_train_loss(tmp_path: Path) -> None:
    make_run(tmp_path / "e" / "low_train", [train(4, loss=0.1), evaluation(4, 3.0)], optimizer__lr=0.1)
    make_run(tmp_path / "e" / "low_eval", [train(4, loss=2.0), evaluation(2, 1.0), evaluation(4, 2.5)])
    compare([tmp_path / "e"], tmp_path / "out")
    rows = rows_by_name(tmp_path / "out")
    assert (rows["low_eval"]["best"], rows["low_train"]["best"]) == ("True", "False")
    assert "| low_eval * |" in (tmp_path / "out" / "compare.md").read_text()
    make_run(tmp_path / "t" / "a", [train(4, loss=0.5)])
    make_run(tmp_path / "t" / "b", [train(4, loss=0.25)])
    compare([tmp_path / "t"], tmp_path / "out2")
    assert rows_by_name(tmp_path / "out2")["b"]["best"] == "True"
    assert "the lowest final train loss" in (tmp_path / "out2" / "compare.md").read_text()


# ---------------------------------------------------------------- states


def test_states(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "done")
    make_run(runs / "stopped", [train(1), train(2), event(2, "stop")], finished=False)
    make_run(runs / "failed", [train(1), event(1, "error", message="boom")], finished=False)
    live = [{**train(1), "time": time.time() - 5}, {**train(2), "time": time.time()}]
    make_run(runs / "live", live, finished=False)
    silent = make_run(runs / "silent", [train(3)], finished=False)  # long silent, no lock: dead
    (runs / "setup").mkdir()
    (runs / "setup" / "plan.json").write_text("{}")  # launched, no record yet
    compare([runs], tmp_path / "out")
    states = {name: row["state"] for name, row in rows_by_name(tmp_path / "out").items()}
    assert states == {
        "done": "finished",
        "failed": "failed at step 1 of 4",
        "live": "running",
        "setup": "not started",
        "silent": "failed at step 3 of 4",
        "stopped": "stopped at step 2 of 4",
    }
    assert silent.is_dir()


# ---------------------------------------------------------------- sweeps and targets


def write_sweep(sweep: Path, names: list[str]) -> None:
    points = [{"name": n, "overrides": [f"optimizer.lr={n.removeprefix('lr-')}"]} for n in names]
    body = {"recipe": "/r.yaml", "fixed": [], "points": points}
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "sweep.json").write_text(json.dumps(body))


def test_a_sweep_keeps_its_order_lists_points_not_started_and_writes_into_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "lr-sweep"
    write_sweep(sweep, ["lr-0.1", "lr-0.001", "lr-0.01"])
    make_run(sweep / "lr-0.1", optimizer__lr=0.1)
    make_run(sweep / "lr-0.001", optimizer__lr=0.001)
    (sweep / "stray").mkdir()  # not a point of the sweep
    assert compare([sweep], None) == 0
    out = sweep / "compare"
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["lr-0.1", "lr-0.001", "lr-0.01"]
    assert [r["label"] for r in rows] == ["optimizer.lr=0.1", "optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert rows[2]["state"] == "not started"
    assert rows[2]["steps"] == ""
    printed = capsys.readouterr().out
    assert f"compare: wrote compare.md, compare.csv, loss.png, lr.png, throughput.png in {out}" in printed
    # Compared again, its own output directory is not taken for a run.
    compare([sweep], None)
    assert "stray" not in capsys.readouterr().out


def test_a_directory_of_runs_expands_sorted_and_duplicates_count_once(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        make_run(tmp_path / "runs" / name)
    (tmp_path / "runs" / "notes").mkdir()
    runs, sweeps = find_runs([tmp_path / "runs", tmp_path / "runs" / "a"])
    assert [r.path.name for r in runs] == ["a", "b", "c"]
    assert sweeps == []


def test_same_names_from_two_sweeps_are_told_apart(tmp_path: Path) -> None:
    for sweep in ("s1", "s2"):
        write_sweep(tmp_path / sweep, ["lr-0.1"])
        make_run(tmp_path / sweep / "lr-0.1", train__seed=int(sweep[1]))
    compare([tmp_path / "s1", tmp_path / "s2"], tmp_path / "out")
    assert sorted(rows_by_name(tmp_path / "out")) == ["s1/lr-0.1", "s2/lr-0.1"]


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_a_target_that_is_no_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    with pytest.raises(UserError) as caught:
        compare([target], tmp_path / "out")
    assert report(caught.value) == 2
    assert capsys.readouterr().err == (
        f"error: compare: {target} is not a run directory or a sweep (no recipe.yaml or sweep.json)\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "body", ['{"points": [{"name": "../up"}]}', "not json", '{"points": 3}', '{"points": []}']
)
def test_a_broken_or_empty_sweep_is_one_line(tmp_path: Path, body: str) -> None:
    (tmp_path / "sweep.json").write_text(body)
    with pytest.raises(UserError) as caught:
        compare([tmp_path], None)
    assert len(caught.value.lines) == 1
    assert "compare: " in caught.value.lines[0]


# ---------------------------------------------------------------- parity and files


def test_a_parity_pair_shows_its_verdict(tmp_path: Path) -> None:
    out = tmp_path / "parity-x"
    make_run(out / "fp32", precision__dtype="fp32")
    make_run(out / "mixed", precision__dtype="bf16")
    runs = {"fp32": str(out / "fp32"), "mixed": str(out / "mixed")}
    body = {"verdict": "fail", "final_rel_diff": 0.039, "max_rel_diff": 0.0409, "runs": runs}
    (out / "parity.json").write_text(json.dumps(body))
    make_run(tmp_path / "other")
    compare([out, tmp_path / "other"], tmp_path / "cmp")
    rows = rows_by_name(tmp_path / "cmp")
    assert (rows["mixed"]["parity"], rows["mixed"]["parity_max_rel_diff"]) == ("fail", "0.0409")
    assert rows["fp32"]["parity"] == "fail"
    assert rows["other"]["parity"] == ""
    assert "| FAIL, max gap 4.09% |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert rows["mixed"]["label"] == "precision.dtype=bf16"


def test_the_plots_are_pngs_whose_legends_name_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(
        tmp_path / "runs" / "a", [train(s) for s in range(1, 5)] + [evaluation(4, 2.0)], optimizer__lr=0.1
    )
    make_run(tmp_path / "runs" / "b", optimizer__lr=0.2)
    drawn: dict[str, tuple[list[str], str]] = {}
    finish = figure.finish

    def spy(fig: Any, axes: Any, path: Path, title: str, context: str, above: bool = False) -> Path:
        drawn[path.name] = ([t.get_text() for t in fig.legends[0].texts], f"{title} — {context}")
        return finish(fig, axes, path, title, context, above)

    monkeypatch.setattr(figure, "finish", spy)
    compare([tmp_path / "runs"], tmp_path / "out")
    assert sorted(drawn) == ["eval_loss.png", "loss.png", "lr.png", "throughput.png"]
    assert drawn["loss.png"] == (
        ["optimizer.lr=0.1", "optimizer.lr=0.2"],
        "Train loss by optimizer.lr — 2 runs",
    )
    assert drawn["eval_loss.png"][0] == ["optimizer.lr=0.1"]  # only the run that evaluated
    for name in drawn:
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_throughput_leaves_step_1_out_unless_it_is_all_there_is(tmp_path: Path) -> None:
    throughput = next(o for o in compare_runs_plots.OVERLAYS if o.key == "tokens_per_s")
    for name, steps, shown in (("long", [1, 2, 3], [2, 3]), ("short", [1], [1])):
        path = make_run(tmp_path / name, [train(s) for s in steps])
        row = Row(name=name, path=path, label=name, state="finished", metrics=read_metrics(path))
        assert compare_runs_plots._series(row, throughput)[0] == shown


def test_without_matplotlib_the_table_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "r")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    assert compare([tmp_path / "r"], tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.csv", "compare.md"]
    captured = capsys.readouterr()
    assert "plots skipped: matplotlib is not installed (pip install -e '.[report]')" in captured.err
    assert captured.out.splitlines()[0].startswith("run ")
    assert "wrote compare.md, compare.csv in" in captured.out
