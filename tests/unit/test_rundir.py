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

# A path built with one of these in it spells a run-directory file by hand.
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
# Words too common to match inside a longer string: caught when they are a whole path part (`x / "logs"`).
DIR_NAMES = ("checkpoints", "tokenizer", "logs", "memory", "tb", "report", "latest", ".lock")
# The owners, by path: the run directory's layout, and what is inside a checkpoint root.
OWNERS = ("launcher/rundir/layout.py", "launcher/rundir/checkpoint.py", "launcher/worker/checkpointer.py")
# Path parts that share a word with the run directory but name another folder, with the reason.
NOT_A_RUN_DIRECTORY = {("bench/gpu_proof.py", "logs"): "the proof's own results folder, out/logs/<step>.log"}
# Where the guard looks: the package and the benchmark scripts (they read run directories too).
GUARDED = sorted(p for p in [*LAUNCHER.rglob("*.py"), *(ROOT / "bench").glob("*.py")])
# Calls whose arguments are path parts: Path("x"), open("x"), os.path.join(a, "x"), p.joinpath("x"), ...
PATH_FUNCTIONS = frozenset({"Path", "PurePath", "PosixPath", "open"})
PATH_METHODS = frozenset({"joinpath", "glob", "rglob", "with_name"})


def _path_parts(tree: ast.AST) -> list[ast.expr]:
    """The expressions `tree` uses as parts of a path: operands of `/` and arguments of path calls."""
    parts: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts += [node.left, node.right]
        elif isinstance(node, ast.Call):
            func = node.func
            named = isinstance(func, ast.Name) and func.id in PATH_FUNCTIONS
            method = isinstance(func, ast.Attribute) and (
                func.attr in PATH_METHODS
                or func.attr in PATH_FUNCTIONS
                or (
                    func.attr == "join"
                    and isinstance(func.value, ast.Attribute)
                    and func.value.attr == "path"
                )
            )
            if named or method:
                parts += [*node.args, *(k.value for k in node.keywords)]
    return parts


def _constants(tree: ast.AST) -> dict[str, list[str]]:
    """The strings each name is assigned anywhere in the module (`METRICS = "metrics.jsonl"`)."""
    bound: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    bound.setdefault(target.id, []).append(node.value.value)
    return bound


def _literals(source: str) -> list[tuple[int, str]]:
    """(line, run-directory name) for every path part in `source` that spells one.

    A path part is an operand of `/`, an argument of Path(), open(), os.path.join() or of a
    path's .joinpath(), .glob(), .rglob() or .with_name(); an f-string or a name bound to a
    string in the module counts when it is one. Strings anywhere else (messages, docs, keys) are
    free to mention the names.
    """
    tree = ast.parse(source)
    bound = _constants(tree)
    found = []
    for part in _path_parts(tree):
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            texts = [part.value]
        elif isinstance(part, ast.JoinedStr):
            texts = [v.value for v in part.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        elif isinstance(part, ast.Name):
            texts = bound.get(part.id, [])
        else:
            continue
        for text in texts:
            found += [(part.lineno, name) for name in FILE_NAMES if name in text]
            found += [(part.lineno, name) for name in DIR_NAMES if text.strip("/") == name]
    return sorted(set(found))


def _found() -> list[tuple[str, int, str]]:
    return [
        (str(path.relative_to(ROOT)), line, name)
        for path in GUARDED
        if str(path.relative_to(ROOT)) not in OWNERS
        for line, name in _literals(path.read_text())
    ]


def test_no_module_but_rundir_spells_a_run_directory_path() -> None:
    stray = [
        f"{path}:{line}: {name!r}" for path, line, name in _found() if (path, name) not in NOT_A_RUN_DIRECTORY
    ]
    assert stray == [], "use launcher.rundir.layout.RunDir for these paths:\n" + "\n".join(stray)


def test_every_exception_is_still_needed() -> None:
    used = {(path, name) for path, _, name in _found()}
    assert set(NOT_A_RUN_DIRECTORY) <= used, "delete the exceptions that match nothing"


def test_the_guard_catches_a_hand_made_path() -> None:
    code = 'p = run_dir / "logs" / f"rank-{r}.err"\nq = Path(d) / "metrics.jsonl"\n"""plan.json in a docstring"""\n'
    assert sorted(name for _, name in _literals(code)) == ["logs", "metrics.jsonl", "rank-"]
    assert _literals('recipe["data"]["tokenizer"] = x\n') == []  # a key, not a path


@pytest.mark.parametrize(
    "code",
    [
        'p = run_dir / "metrics.jsonl"',
        'p = open("runs/x/metrics.jsonl")',
        'p = Path(f"{run_dir}/metrics.jsonl")',
        'p = os.path.join(run_dir, "metrics.jsonl")',
        'p = run_dir.joinpath("metrics.jsonl")',
        'p = run_dir.with_name("metrics.jsonl")',
        'p = pathlib.Path(run_dir, "metrics.jsonl")',
        'METRICS = "metrics.jsonl"\np = run_dir / METRICS',
        'p = run_dir / f"metrics.jsonl.{n}"',
    ],
)
def test_a_run_directory_name_in_a_path_is_flagged(code: str) -> None:
    assert [name for _, name in _literals(code)] == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "code",
    [
        'raise UserError(f"{path}: metrics.jsonl is torn at line {n}")',
        'print("see logs/rank-0.err and the checkpoints folder")',
        'HINT = "delete the FINISHED marker to run again"',
        'for step in run_dir.glob("*.json"): pass',
        "p = run_dir / name  # name is bound to nothing here",
    ],
)
def test_a_run_directory_name_in_a_message_is_free(code: str) -> None:
    assert _literals(code) == []


def test_the_guard_reads_bench_scripts_and_skips_only_the_owners() -> None:
    names = {str(p.relative_to(ROOT)) for p in GUARDED}
    assert "bench/gpu.py" in names
    assert "launcher/plan/resolve.py" in names
    assert set(OWNERS) <= names  # the owners exist where the allowlist says


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
