"""The run directory is one value: every path is named in launcher/rundir/layout.py, and nowhere else."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launcher"
TEMPLATE = ROOT / "slurm" / "sbatch.sh.j2"

# A string holding one of these, anywhere in code, spells a run-directory file by hand.
FILE_NAMES = (
    "plan.json",
    "recipe.yaml",
    "command.txt",
    "env.json",
    "metrics.jsonl",
    "metrics-",
    "FINISHED",
    "manifest.json",
    "rank-",
    "requeues.json",
    "job.sbatch",
    "slurm-%j",
    ".tmp-",
    "step-",
)
# Words too common to ban outright: caught when they are joined onto a path (`x / "logs"`).
DIR_NAMES = ("checkpoints", "tokenizer", "logs", "memory", "tb", "report", "latest", ".lock")
# The owners: rundir names the run directory; checkpoint names what is inside a checkpoint root.
OWNERS = {"layout.py", "checkpoint.py", "checkpointer.py"}
# Literals still spelled in files this refactor did not own; each owner switches to RunDir and
# deletes its line here. Nothing may be added.
NOT_YET_MOVED = {}


def _literals(source: str) -> list[tuple[int, str]]:
    """(line, banned name) for every string in code that spells a run-directory name.

    Docstrings (of modules, classes, functions and attributes) and help/description texts
    document the layout and are skipped.
    """
    tree = ast.parse(source)
    prose: set[int] = set()
    joined: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            prose.add(id(node.value))
        elif isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            prose.update(id(n) for n in ast.walk(node.value))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            joined.update((id(node.left), id(node.right)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            found += [(node.lineno, name) for name in FILE_NAMES if name in node.value]
            found += [(node.lineno, name) for name in DIR_NAMES if node.value == name and id(node) in joined]
    return found


def test_no_module_but_rundir_spells_a_run_directory_path() -> None:
    stray = [
        f"launcher/{path.relative_to(LAUNCHER)}:{line}: {name!r}"
        for path in sorted(LAUNCHER.rglob("*.py"))
        if path.name not in OWNERS
        for line, name in _literals(path.read_text())
        if (path.name, name) not in NOT_YET_MOVED
    ]
    assert stray == [], "use launcher.rundir.layout.RunDir for these paths:\n" + "\n".join(stray)


def test_the_guard_catches_a_hand_made_path() -> None:
    code = 'p = run_dir / "logs" / f"rank-{r}.err"\nq = Path(d) / "metrics.jsonl"\n"""plan.json in a docstring"""\n'
    assert sorted(name for _, name in _literals(code)) == ["logs", "metrics.jsonl", "rank-"]
    assert _literals('recipe["data"]["tokenizer"] = x\n') == []  # a key, not a path


def test_the_sbatch_template_takes_its_file_names_from_the_run_directory() -> None:
    text = re.sub(r"\{#.*?#\}", "", TEMPLATE.read_text(), flags=re.S)  # Jinja comments are not output
    stray = [name for name in (*FILE_NAMES, "/logs") if name in text]
    assert stray == []


# ---------------------------------------------------------------- the value


def test_checkpoint_dir_is_relative_to_the_run_directory_or_absolute(tmp_path: Path) -> None:
    assert RunDir.of(tmp_path).checkpoints == tmp_path / "checkpoints"
    assert RunDir.of(tmp_path, "ckpt/a").checkpoints == tmp_path / "ckpt" / "a"
    assert RunDir.of(tmp_path, str(tmp_path / "elsewhere")).checkpoints == tmp_path / "elsewhere"
    run = RunDir.of(tmp_path / "run")
    assert run.plan_file == tmp_path / "run" / "plan.json"
    assert run.rank_error(3) == tmp_path / "run" / "logs" / "rank-3.err"
    assert run.memory_report(1) == tmp_path / "run" / "memory" / "rank-1.json"
    assert run.slurm_log("out") == tmp_path / "run" / "slurm" / "slurm-%j.out"


def test_from_plan_reads_run_dir_and_checkpoint_dir(tmp_path: Path) -> None:
    from launcher.plan.hardware import Hardware
    from launcher.plan.resolve import resolve
    from launcher.recipe.schema import load

    recipe = load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", "checkpoint.dir=ck"])
    plan = resolve(recipe, Hardware(cpu_count=2))
    run = RunDir.from_plan(plan)
    assert run.path == Path(plan.run_dir)
    assert run.checkpoints == Path(plan.run_dir) / "ck"
    assert plan.plan_path == run.plan_file


def test_prepare_writes_the_launch_files_and_finished_round_trips(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "a" / "run")
    run.prepare(plan_json="{}", recipe_yaml="name: x\n", command="mplaunch x\n", env_json="{}\n")
    assert run.is_run_dir()
    assert run.recipe_file.read_text() == "name: x\n"
    assert run.finished_step() is None
    run.write_finished(120)
    assert run.finished_step() == 120
    run.clear_finished()
    assert run.finished_step() is None
    run.metrics.write_text("{}\n")
    archived = run.archive_metrics()
    assert archived is not None
    assert archived.read_text() == "{}\n"
    assert not run.metrics.exists()
    assert run.archive_metrics() is None


def test_rank_errors_round_trip_and_the_earliest_written_wins(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path)
    assert run.first_rank_error() is None
    run.write_rank_error(1, "model.target: cannot import 'x'", "Traceback ...\n\nmore")
    run.write_rank_error(0, "interrupted", "Traceback ...")
    run.write_rank_error(2, "also first", "")
    # rank 1 wrote first; rank 2 at the same moment (ties go to the lower rank); rank 0 later.
    os.utime(run.rank_error(1), (1000, 1000))
    os.utime(run.rank_error(2), (1000, 1000))
    os.utime(run.rank_error(0), (2000, 2000))
    (run.logs / "rank-9.err").write_text("")  # an empty file is no report
    errors = run.rank_errors()
    assert [(e.rank, e.message) for e in errors] == [
        (1, "model.target: cannot import 'x'"),
        (2, "also first"),
        (0, "interrupted"),
    ]
    first = run.first_rank_error()
    assert first is not None
    assert first.label == "rank-1"
    assert first.path == run.rank_error(1)
    run.clear_rank_errors()
    assert run.rank_errors() == []


def _checkpoint(root: Path, step: int) -> Path:
    tmp = checkpoint.begin(root, step)
    (tmp / "weights.pt").write_bytes(b"w")
    return checkpoint.commit(
        tmp, {"step": step, "world_size": 1, "backend": "accelerate", "zero_stage": 0}, keep=5
    )


@pytest.mark.parametrize("custom", [None, "ck", "ABSOLUTE"])
def test_the_resume_point_is_the_latest_complete_checkpoint(tmp_path: Path, custom: str | None) -> None:
    checkpoint_dir = str(tmp_path / "abs") if custom == "ABSOLUTE" else custom
    run = RunDir.of(tmp_path / "run", checkpoint_dir)
    assert run.resume_point().path is None
    _checkpoint(run.checkpoints, 2)
    _checkpoint(run.checkpoints, 4)
    torn = checkpoint.step_dir(run.checkpoints, 6)
    torn.mkdir()  # written, never sealed: no manifest
    (run.checkpoints / "step-00000008").mkdir()
    (run.checkpoints / "step-00000008" / "manifest.json").write_text(json.dumps({"step": "8"}))
    found = run.resume_point()
    assert found.path == checkpoint.step_dir(run.checkpoints, 4)
    assert found.manifest is not None
    assert found.manifest["step"] == 4
    assert any(line.startswith("step-00000006: incomplete") for line in found.ignored)
    # `report` counts checkpoints by the same rules.
    assert run.checkpoint_steps() == [2, 4]


def test_heartbeats_round_trip_and_are_cleared(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "run")
    assert run.heartbeat(1) == tmp_path / "run" / "logs" / "rank-1.heartbeat"
    assert run.stack_dump(1) == tmp_path / "run" / "logs" / "rank-1.stack"
    assert run.lock == tmp_path / "run" / ".lock"
    run.write_heartbeat(0, 3, "step")  # no logs directory yet: dropped, never raised
    assert run.heartbeats() == {}
    run.logs.mkdir(parents=True)
    run.write_heartbeat(0, 3, "step")
    run.write_heartbeat(1, 2, "checkpoint")
    run.stack_dump(1).write_text("Current thread 0x1 (most recent call first):\n")
    beats = run.heartbeats()
    assert {r: (b["step"], b["phase"], b["pid"]) for r, b in beats.items()} == {
        0: (3, "step", os.getpid()),
        1: (2, "checkpoint", os.getpid()),
    }
    run.clear_heartbeats()
    assert run.heartbeats() == {} and not run.stack_dump(1).exists()


def test_the_cause_is_preferred_over_an_earlier_peer_error(tmp_path: Path) -> None:
    from launcher.rundir.layout import RankError

    run = RunDir.of(tmp_path / "run")
    run.write_rank_error(1, "RuntimeError: Connection closed by peer [::1]:29500", "")
    os.utime(run.rank_error(1), (1000, 1000))
    printed = [RankError(0, "no space left on device: /x (0 bytes free)", run.rank_error(0))]
    first = run.failed_rank(printed)
    assert first is not None and first.rank == 0  # printed only: its file was lost to a full disk
    assert run.first_rank_error() is not None and run.first_rank_error().rank == 1  # type: ignore[union-attr]
