"""`mplaunch sweep` without runs: value splitting, the grid, the points file, names, sweep.json, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.errors import UserError
from launcher.run import sweep_local
from launcher.run.sweep import SWEEP_FILE, Point, Sweep, build, read_record, write_record
from launcher.run.sweep_points import (
    Draft,
    drafts,
    parse_arguments,
    point_names,
    read_points_file,
    split_values,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # launcher.recipe.sections.Recipe.name


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.yaml"
    body = {
        "name": "mlp",
        "model": {"name": "tiny-mlp"},
        "backend": "accelerate",
        "launch": {"nproc_per_node": 1, "device": "cpu"},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 3},
        "logging": {"dir": str(tmp_path / "runs")},
    }
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1e-3,2e-3", ["1e-3", "2e-3"]),
        ("[a,b],[c]", ["[a,b]", "[c]"]),
        ("{x: 1, y: 2},{x: 3}", ["{x: 1, y: 2}", "{x: 3}"]),
        ("'a,b',c", ["'a,b'", "c"]),
        ('"a,b",c', ['"a,b"', "c"]),
        ("don't,do", ["don't", "do"]),
        ("[a,b]", ["[a,b]"]),
        ("single", ["single"]),
    ],
)
def test_values_split_on_top_level_commas_only(text: str, values: list[str]) -> None:
    assert split_values(text) == values


def test_one_value_is_fixed_several_are_an_axis() -> None:
    fixed, axes = parse_arguments(["train.max_steps=4", "optimizer.lr=1e-3,2e-3", "precision.fp8.keep=[a,b]"])
    assert fixed == ("train.max_steps=4", "precision.fp8.keep=[a,b]")
    assert axes == [("optimizer.lr", ["1e-3", "2e-3"])]


def test_the_grid_is_the_product_in_argument_order() -> None:
    _, axes = parse_arguments(["optimizer.lr=1,2", "train.seed=7,8,9"])
    got = [d.overrides for d in drafts(axes, None)]
    assert got == [
        (f"optimizer.lr={lr}", f"train.seed={seed}") for lr in ("1", "2") for seed in ("7", "8", "9")
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["name=a,b"], "name cannot be swept"),
        (["logging.dir=a,b"], "logging.dir cannot be swept"),
        (["optimizer.lr=1,"], "empty value"),
        (["optimizer.lr=1,2", "optimizer.lr=3"], "given twice"),
        (["optimizer.lr=[1,2"], "not valid YAML"),
        (["lr"], "expected dotted.key=value"),
    ],
)
def test_bad_arguments_are_refused(arguments: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_arguments(arguments)


def test_nothing_to_sweep_and_duplicates_are_refused() -> None:
    with pytest.raises(UserError, match="nothing to sweep"):
        drafts([], None)
    with pytest.raises(UserError, match="same run"):  # 1e-3 and 0.001 are one value
        drafts([("optimizer.lr", ["1e-3", "0.001"])], None)


def test_names_are_readable_valid_and_unique() -> None:
    _, axes = parse_arguments(["optimizer.lr=1e-3,3e-4", "train.global_batch_size=16,32"])
    names = point_names(drafts(axes, None))
    assert names == [
        "lr-1e-3_global_batch_size-16",
        "lr-1e-3_global_batch_size-32",
        "lr-3e-4_global_batch_size-16",
        "lr-3e-4_global_batch_size-32",
    ]


def test_names_use_the_full_key_when_two_leaves_match_and_a_hash_when_names_collide() -> None:
    shared = point_names(
        [Draft((("a.seed", "1"), ("b.seed", "2"))), Draft((("a.seed", "3"), ("b.seed", "4")))]
    )
    assert shared == ["a.seed-1_b.seed-2", "a.seed-3_b.seed-4"]
    clash = point_names([Draft((("x.keep", "[a/b]"),)), Draft((("x.keep", "[a-b]"),))])
    assert clash[0] != clash[1]
    assert all(re.fullmatch(r"keep-a-b-[0-9a-f]{6}", n) for n in clash), clash
    long = point_names([Draft((("x.k", "v" * 300),))])[0]
    assert len(long) <= 100
    assert all(NAME.match(n) for n in [*shared, *clash, long, *point_names([Draft((("x.k", "''"),))])])


def test_points_file_with_names_and_a_grid(tmp_path: Path) -> None:
    path = tmp_path / "points.yaml"
    path.write_text("- {name: small, optimizer.lr: 1.0e-3, train.seed: 1}\n- {optimizer.lr: 0.002}\n")
    from_file = read_points_file(path)
    assert from_file[0] == Draft((("optimizer.lr", "0.001"), ("train.seed", "1")), "small")
    _, axes = parse_arguments(["train.max_steps=2,4"])
    points = drafts(axes, from_file)
    assert [d.overrides for d in points][:2] == [
        ("optimizer.lr=0.001", "train.seed=1", "train.max_steps=2"),
        ("optimizer.lr=0.001", "train.seed=1", "train.max_steps=4"),
    ]
    assert point_names(points) == [
        "small_max_steps-2",
        "small_max_steps-4",
        "lr-0.002_max_steps-2",
        "lr-0.002_max_steps-4",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optimizer.lr: 1\n", "list of mappings"),
        ("[]\n", "list of mappings"),
        ("- 1\n", "list of mappings"),
        ("- {optimizer.lr: [1\n", "not valid YAML"),
        ("- {'bad key': 1}\n", "not a dotted recipe key"),
        ("- {logging.dir: x}\n", "logging.dir cannot be set per point"),
        ("- {name: [1], train.seed: 1}\n", "name must be text"),
    ],
)
def test_a_bad_points_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "points.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        read_points_file(path)


def test_build_places_the_sweep_and_checks_every_point(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    sweep, points, recipes = build(recipe, ["optimizer.lr=1e-3,2e-3", "train.max_steps=2"], {}, None, None)
    assert sweep.dir == tmp_path / "runs" / "mlp-sweep"
    assert [p.index for p in points] == [0, 1]
    assert sweep.run_overrides(points[1])[-2:] == [f"logging.dir={sweep.dir}", "name=lr-2e-3"]
    assert recipes["lr-2e-3"].optimizer.lr == 2e-3
    assert recipes["lr-2e-3"].train.max_steps == 2
    assert not sweep.dir.exists()  # build writes nothing
    assert build(recipe, ["train.seed=1,2"], {}, None, "mine")[0].dir == tmp_path / "runs" / "mine"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["optimizer.lrr=1e-3,2e-3"],
            "sweep, every point: override optimizer.lrr: unknown key; did you mean optimizer.lr?",
        ),
        (["optimizer.lr=1e-3,abc"], "sweep, point lr-abc: override optimizer.lr: expected a number"),
        (["optimizer.lr=1e-3,2e-3", "optimizer.lr=1"], "given twice"),
    ],
)
def test_build_refuses_bad_points_naming_them(tmp_path: Path, arguments: list[str], message: str) -> None:
    with pytest.raises(UserError) as caught:
        build(_recipe(tmp_path), arguments, {}, None, None)
    assert message in caught.value.lines[0], caught.value.lines


def test_a_rerun_merges_into_sweep_json(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    first, _, _ = build(recipe, ["optimizer.lr=1e-3,2e-3"], {}, None, None)
    write_record(first)
    again, chosen, _ = build(recipe, ["optimizer.lr=3e-3,0.001"], {}, None, None)
    assert [(p.index, p.name) for p in chosen] == [(2, "lr-3e-3"), (0, "lr-1e-3")]  # 0.001 is 1e-3's point
    write_record(again)
    record = json.loads((first.dir / SWEEP_FILE).read_text())
    assert record["recipe"] == str(recipe.resolve())
    assert [p["name"] for p in record["points"]] == ["lr-1e-3", "lr-2e-3", "lr-3e-3"]
    assert read_record(first.dir) == record


def test_a_rerun_with_other_fixed_overrides_or_a_renamed_point_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    write_record(build(recipe, ["optimizer.lr=1e-3,2e-3"], {}, None, None)[0])
    with pytest.raises(UserError, match=r"other fixed overrides.*--name mlp-sweep-2"):
        build(recipe, ["optimizer.lr=1e-3,2e-3", "train.seed=5"], {}, None, None)
    points = tmp_path / "points.yaml"
    points.write_text("- {name: lr-1e-3, optimizer.lr: 0.5}\n")
    with pytest.raises(UserError, match="its point lr-1e-3 was run with optimizer.lr=1e-3"):
        build(recipe, [], {}, points, None)
    (tmp_path / "runs" / "mlp-sweep" / SWEEP_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="not a sweep record"):
        build(recipe, ["optimizer.lr=1e-3,2e-3"], {}, None, None)


def test_state_reads_finished_and_checkpoints(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    sweep, points, recipes = build(recipe, ["optimizer.lr=1e-3,2e-3"], {}, None, None)
    run = sweep.run_dir(points[0])
    assert sweep_local.state(sweep, points[0], recipes[points[0].name]).describe() == "new"
    run.mkdir(parents=True)
    (run / "FINISHED").write_text(json.dumps({"step": 2}))  # FINISHED before the recipe's 3 steps
    assert not sweep_local.state(sweep, points[0], recipes[points[0].name]).finished
    (run / "FINISHED").write_text(json.dumps({"step": 3}))
    assert sweep_local.state(sweep, points[0], recipes[points[0].name]).describe() == "finished"


def test_dry_run_lists_points_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path)
    assert cli.main(["sweep", str(recipe), "optimizer.lr=1e-3,2e-3", "train.seed=1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 points in" in out
    for index, name in enumerate(["lr-1e-3_seed-1", "lr-1e-3_seed-2", "lr-2e-3_seed-1", "lr-2e-3_seed-2"]):
        assert re.search(rf"^\s+{index}\s+{name}\s+optimizer.lr=", out, re.MULTILINE), out
        assert f"{tmp_path / 'runs' / 'mlp-sweep' / name}: new" in out
    assert "would run 4 of them here" in out
    assert not (tmp_path / "runs").exists()


def test_local_run_runs_each_unfinished_point_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The runs themselves are the e2e tests'; here each "run" is a stand-in exit code.
    codes = iter([3, 0])
    ran: list[list[str]] = []

    def fake_run(self: object, argv: list[str]) -> int:
        ran.append(argv)
        return next(codes)

    monkeypatch.setattr(sweep_local._Stopper, "run", fake_run)
    recipe = _recipe(tmp_path)
    done = tmp_path / "runs" / "mlp-sweep" / "lr-1e-3"
    done.mkdir(parents=True)
    (done / "FINISHED").write_text(json.dumps({"step": 3}))
    code = cli.main(["sweep", str(recipe), "optimizer.lr=1e-3,2e-3,3e-3"])
    out = capsys.readouterr().out
    assert code == 1
    assert [a[-1] for a in ran] == ["name=lr-2e-3", "name=lr-3e-3"]
    assert "point 1 of 3, lr-1e-3: already finished, skipped" in out
    assert "point 2 of 3, lr-2e-3 (optimizer.lr=2e-3):" in out
    assert re.search(r"0\s+lr-1e-3\s+skipped: already finished", out)
    assert re.search(r"1\s+lr-2e-3\s+failed: exit 3", out)
    assert re.search(r"2\s+lr-3e-3\s+finished", out)
    assert f"mplaunch compare {tmp_path / 'runs' / 'mlp-sweep'}" in out
    assert (tmp_path / "runs" / "mlp-sweep" / SWEEP_FILE).is_file()


def test_slurm_gets_the_unfinished_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.run import sweep_slurm

    calls: list[tuple[Sweep, list[Point], dict[str, object]]] = []

    def submit(sweep: Sweep, todo: list[Point], **kwargs: object) -> int:
        calls.append((sweep, list(todo), kwargs))
        return 0

    monkeypatch.setattr(sweep_slurm, "submit", submit)
    recipe = _recipe(tmp_path)
    done = tmp_path / "runs" / "mlp-sweep" / "lr-1e-3"
    done.mkdir(parents=True)
    (done / "FINISHED").write_text(json.dumps({"step": 3}))
    argv = ["sweep", str(recipe), "optimizer.lr=1e-3,2e-3", "--slurm", "--nodes", "2", "--max-parallel", "1"]
    assert cli.main([*argv, "--dry-run"]) == 0
    assert not (done.parent / SWEEP_FILE).exists()
    assert cli.main(argv) == 0
    assert (done.parent / SWEEP_FILE).is_file()
    assert [[p.name for p in todo] for _, todo, _ in calls] == [["lr-2e-3"], ["lr-2e-3"]]
    assert [kw["dry_run"] for _, _, kw in calls] == [True, False]
    assert calls[1][2]["values"] == {"launch.nnodes": 2}
    assert calls[1][2]["max_parallel"] == 1


@pytest.mark.parametrize(
    "extra",
    [
        ["--nodes", "2"],
        ["--max-parallel", "2"],
        ["--slurm", "--max-parallel", "0"],
        ["--points", "missing.yaml"],
    ],
)
def test_cli_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code = cli.main(["sweep", str(_recipe(tmp_path)), "optimizer.lr=1e-3,2e-3", *extra, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")


def test_compare_verb_passes_its_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    got: list[tuple[list[Path], Path | None]] = []
    fake = types.ModuleType("launcher.analysis.compare_runs")
    fake.compare = lambda targets, out: got.append((list(targets), out)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "launcher.analysis.compare_runs", fake)
    assert cli.main(["compare", "a", "b", "--out", str(tmp_path)]) == 0
    assert got == [([Path("a"), Path("b")], tmp_path)]
    assert cli.main(["compare"]) == 2


def test_ctrl_c_reaches_the_running_point_once_and_no_point_starts_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal
    import sys
    import threading
    import time

    ready, got = tmp_path / "ready", tmp_path / "got"
    child = (
        "import signal, sys, time, pathlib\n"
        "seen = []\n"
        "signal.signal(signal.SIGINT, lambda *a: seen.append(1))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "t0 = time.monotonic()\n"
        "while not seen and time.monotonic() < t0 + 60: time.sleep(0.01)\n"
        "time.sleep(0.3)\n"  # a second signal would arrive now
        f"pathlib.Path({str(got)!r}).write_text(str(len(seen)))\n"
        "sys.exit(130)\n"
    )
    monkeypatch.setattr(sweep_local, "command", lambda sweep, point: [sys.executable, "-c", child])
    sweep, points, recipes = build(_recipe(tmp_path), ["optimizer.lr=1e-3,2e-3"], {}, None, None)
    states = {p.name: sweep_local.state(sweep, p, recipes[p.name]) for p in points}

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C reaches the sweep

    thread = threading.Thread(target=interrupt)
    thread.start()
    code = sweep_local.run_points(sweep, points, states)
    thread.join()
    out = capsys.readouterr().out
    assert code == 130
    assert got.read_text() == "1"
    assert re.search(r"0\s+lr-1e-3\s+stopped \(exit 130\): a rerun resumes it", out), out
    assert re.search(r"1\s+lr-2e-3\s+not started", out), out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
