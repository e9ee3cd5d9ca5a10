"""What a user sees before the first step, and where DeepSpeed's ops are built.

- Each setup phase is said as it begins: the heartbeat's `detail`, which the live bar shows with
  the time taken so far, and, with no bar, one line from rank 0 for a phase still going after 10 s.
- The workers of a DeepSpeed run build its ops in a directory of this environment's own
  (TORCH_EXTENSIONS_DIR), not in torch's default one, which every environment of the user shares.
- The backend phase says "building DeepSpeed's CPU communication op (first run only, ~1-2 min)"
  exactly when the op is not built for this DeepSpeed yet.

The real build, on a terminal and piped, is in tests/e2e/test_progress.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from rich.console import Console as RichConsole

from launcher.plan import processes
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import validate
from launcher.recipe.sections import Recipe
from launcher.run import progress
from launcher.run.progress import Bar, Phases
from launcher.rundir.layout import RunDir
from launcher.rundir.watchdog import STARTUP_S, Beat, HangRule
from tests.runs import train_record

CPU = Hardware(gpus=(), cpu_count=4)
BUILDING = "building DeepSpeed's CPU communication op (first run only, ~1-2 min)"
SHM = "deepspeed_shm_comm"


def _recipe(tmp_path: Path, **sections: object) -> Recipe:
    raw: dict[str, object] = {
        "name": "t",
        "model": {"name": "tiny-mlp"},
        "train": {"micro_batch_size": 4, "max_steps": 10},
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "precision": {"dtype": "fp32"},
        "logging": {"dir": str(tmp_path)},
        **sections,
    }
    return validate(raw, "test")


# ------------------------------------------------------------------ the extensions directory


def test_a_deepspeed_run_builds_its_ops_in_this_environments_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(processes.EXTENSIONS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = resolve(_recipe(tmp_path), CPU).env
    ops_dir = Path(env[processes.EXTENSIONS_ENV])
    assert ops_dir.parent == tmp_path / "cache" / "mplaunch" / "torch_extensions"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert ops_dir.name.startswith(f"{python}-torch{metadata.version('torch')}-deepspeed")
    # Another environment (another sys.prefix) with the same versions gets another directory.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other = resolve(_recipe(tmp_path), CPU).env[processes.EXTENSIONS_ENV]
    assert Path(other).parent == ops_dir.parent
    assert other != str(ops_dir)


def test_the_users_own_extensions_directory_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(processes.EXTENSIONS_ENV, str(tmp_path / "mine"))
    assert processes.EXTENSIONS_ENV not in resolve(_recipe(tmp_path), CPU).env  # the workers inherit it
    monkeypatch.delenv(processes.EXTENSIONS_ENV)
    assert processes.EXTENSIONS_ENV not in resolve(_recipe(tmp_path, backend="accelerate"), CPU).env


# ------------------------------------------------------------------ what the backend phase says


def _deepspeed_dir() -> str:
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepspeed is not installed")
    return os.path.abspath(next(iter(spec.submodule_search_locations)))


def _built(root: Path, op: str, sources: str) -> None:
    (root / op).mkdir(parents=True)
    (root / op / f"{op}.so").write_bytes(b"\x7fELF")
    (root / op / "build.ninja").write_text(f"build shm.o: compile {sources}/ops/csrc/cpu/comm/shm.cpp\n")


def test_the_backend_phase_says_when_it_builds_the_cpu_communication_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = _deepspeed_dir()
    root = tmp_path / "ops"
    monkeypatch.setenv(processes.EXTENSIONS_ENV, str(root))
    recipe = _recipe(tmp_path)
    assert processes.backend_starting(recipe, "cpu", {}) == BUILDING  # an empty directory
    assert processes.backend_starting(recipe, "cpu", {SHM: True}) == "starting DeepSpeed"  # prebuilt
    _built(root, SHM, "/elsewhere/venv/lib/python3.11/site-packages/deepspeed")
    assert processes.backend_starting(recipe, "cpu", {}) == BUILDING  # another environment's build
    (root / SHM / "build.ninja").write_text(f"build shm.o: compile {here}/ops/csrc/cpu/comm/shm.cpp\n")
    assert processes.backend_starting(recipe, "cpu", {}) == "starting DeepSpeed"
    (root / SHM / f"{SHM}.so").unlink()  # a build that did not finish
    assert processes.backend_starting(recipe, "cpu", {}) == BUILDING


def test_the_backend_phase_names_every_op_it_builds_and_none_for_accelerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(processes.EXTENSIONS_ENV, str(tmp_path / "ops"))
    offload = _recipe(tmp_path, zero={"stage": 2, "offload_optimizer": True})
    assert processes.backend_starting(offload, "cpu", {}) == (
        "building DeepSpeed's CPU communication op and CPU Adam op (first run only, ~1-2 min)"
    )
    assert processes.backend_starting(offload, "cuda", {}) == (
        "building DeepSpeed's CPU Adam op (first run only, ~1-2 min)"
    )
    assert processes.backend_starting(_recipe(tmp_path), "cuda", {}) == "starting DeepSpeed"
    accelerate = _recipe(tmp_path, backend="accelerate")
    assert processes.backend_starting(accelerate, "cpu", {}) == "starting Accelerate"
    monkeypatch.delenv(processes.EXTENSIONS_ENV)  # torch's default directory: cannot tell
    assert processes.backend_starting(_recipe(tmp_path), "cpu", {}) == (
        "starting DeepSpeed (a first run builds its CPU communication op first, ~1-2 min)"
    )


# ------------------------------------------------------------------ each phase said as it begins


def test_each_phase_is_said_in_the_heartbeat_and_timed(tmp_path: Path) -> None:
    files = RunDir.of(tmp_path / "run")
    files.logs.mkdir(parents=True)
    phases = Phases.for_rank(files, 1)
    phases.begin("making the synthetic data")
    beat = files.heartbeats()[1]
    assert (beat["phase"], beat["step"], beat["detail"]) == ("setup", 0, "making the synthetic data")
    phases.end("data", then=BUILDING)
    assert files.heartbeats()[1]["detail"] == BUILDING
    phases.end("backend")
    phases.begin("running the first step", "train", 7)
    beat = files.heartbeats()[1]
    assert (beat["phase"], beat["step"], beat["detail"]) == ("train", 7, "running the first step")
    phases.end("first step")
    assert list(phases.seconds) == ["start", "data", "backend", "first step"]
    files.write_heartbeat(1, 8, "step")
    assert "detail" not in files.heartbeats()[1]  # a step's beat says nothing more


def test_a_setup_phase_keeps_the_setup_allowance_of_the_hang_rule(tmp_path: Path) -> None:
    files = RunDir.of(tmp_path / "run")
    files.logs.mkdir(parents=True)
    Phases.for_rank(files, 0).begin(BUILDING)
    beat = Beat.parse(files.heartbeats()[0])
    assert beat is not None
    assert beat.phase == "setup"
    rule = HangRule(60.0, 1, beat.time)
    assert rule.check({0: beat}, beat.time + STARTUP_S - 1) is None  # a build past the 60 s limit
    assert rule.check({0: beat}, beat.time + STARTUP_S + 1) is not None


@pytest.mark.parametrize(("rank", "bar", "says"), [(0, False, True), (0, True, False), (1, False, False)])
def test_only_rank_0_without_the_bar_prints_the_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, bar: bool, says: bool
) -> None:
    if bar:
        monkeypatch.setenv(progress.ENV, progress.LAUNCHER)
    else:
        monkeypatch.delenv(progress.ENV, raising=False)
    assert Phases.for_rank(RunDir.of(tmp_path), rank).say is says


def test_a_phase_still_going_after_a_while_gets_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    phases = Phases(say=True, after_s=1.0)
    phases.begin("building the model")
    phases.end(
        "model", then=BUILDING
    )  # done at once: its line never comes, though the build's wait is longer
    time.sleep(1.8)
    phases.end("backend")
    assert capsys.readouterr().out == f"mplaunch: still {BUILDING} after 1 s\n"
    assert Phases().say is False  # by default nothing is printed


# ------------------------------------------------------------------ the bar


def _render(bar: Bar) -> str:
    console = RichConsole(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    console.print(bar.progress)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_the_bar_says_what_rank_0_does_and_for_how_long(tmp_path: Path) -> None:
    files = RunDir.of(tmp_path / "run")
    files.logs.mkdir(parents=True)
    bar = Bar(20, False, files.metrics, RichConsole(file=io.StringIO()), files.heartbeat(0))
    bar.update({})
    assert "setup" in _render(bar)
    assert "starting the workers | 0:00 elapsed" in _render(bar)
    files.write_heartbeat(0, 0, "setup", BUILDING)
    raw = files.heartbeats()[0]
    raw["time"] = time.time() - 83  # the build began 83 s ago
    files.heartbeat(0).write_text(json.dumps(raw))
    beat = Beat.parse(raw)
    assert beat is not None
    bar.update({0: beat})
    text = _render(bar)
    assert "setup" in text
    assert " 0/20 " in text
    assert f"{BUILDING} | 1:23 elapsed" in text
    files.write_heartbeat(0, 1, "step")  # the first step is done: its record, no more setup
    files.metrics.write_text(json.dumps(train_record(step=1)) + "\n")
    beat = Beat.parse(files.heartbeats()[0])
    assert beat is not None
    bar.update({0: beat})
    text = _render(bar)
    assert "train" in text
    assert "elapsed" not in text
    assert "loss 2.5000" in text


def test_the_terminal_bar_reads_rank_0s_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in ("FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stderr", Terminal())
    plan = resolve(_recipe(tmp_path, logging={"dir": str(tmp_path), "progress": True}), CPU)
    bar = Bar.for_terminal(plan)
    assert bar is not None
    assert bar.heartbeat == RunDir.from_plan(plan).heartbeat(0)
