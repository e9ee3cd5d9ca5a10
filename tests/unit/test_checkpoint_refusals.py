"""What the launcher does with a run's checkpoint folder before it starts (launcher.run.preflight):
it removes what interrupted saves left, refuses a folder another run wrote into, and refuses to
train afresh beside checkpoints that all failed verification unless told to (checkpoint.resume=never).

Checkpoints are made by hand here; real runs are in tests/e2e/test_checkpoint_ownership.py and
tests/e2e/test_checkpoint_integrity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load, to_dict
from launcher.run import preflight
from launcher.rundir import checkpoint, ownership
from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[2]


def _plan(logging_dir: Path, *overrides: str) -> Plan:
    base = [f"logging.dir={logging_dir}", "data.kind=synthetic", "data.paths=[]", "launch.nproc_per_node=1"]
    return resolve(load(ROOT / "recipes" / "bert_tiny.yaml", [*base, *overrides]), Hardware(cpu_count=2))


def _save(plan: Plan, step: int, writer: Path | None = None) -> Path:
    """A checkpoint this plan can resume, as the workers write it; `writer`: the run directory it names."""
    root = RunDir.from_plan(plan).checkpoints
    tmp = checkpoint.begin(root, step)
    (tmp / "weights.bin").write_bytes(b"w" * 64)
    manifest = {
        "step": step,
        **checkpoint.structure(plan),
        "recipe": to_dict(plan.recipe),
        ownership.RUN_KEY: ownership.identity(writer or Path(plan.run_dir)),
        "files": [{"path": "weights.bin", "size": 64, "crc32": "0"}],
    }
    return checkpoint.commit(tmp, manifest, keep=5)


def test_leftovers_of_an_interrupted_save_are_removed_before_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(tmp_path)
    _save(plan, 2)
    root = RunDir.from_plan(plan).checkpoints
    (root / ".tmp-step-00000004").mkdir()
    (root / ".tmp-step-00000004" / "model.pt").write_bytes(b"half")
    assert preflight.check_resume(plan) == f"step 2 ({root / 'step-00000002'})"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    said = capsys.readouterr().err
    assert f"mplaunch: removed .tmp-step-00000004 from {root}: left by a save that did not finish" in said
    assert "interrupted write" not in said  # removed, so no longer a warning


def test_a_run_with_the_same_name_elsewhere_is_refused_its_folder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    first = _plan(tmp_path / "x", f"checkpoint.dir={shared}")
    second = _plan(tmp_path / "y", f"checkpoint.dir={shared}")
    assert RunDir.from_plan(first).checkpoints == RunDir.from_plan(second).checkpoints
    Path(first.run_dir).mkdir(parents=True)
    _save(first, 2)
    with pytest.raises(UserError) as refused:
        preflight.check_resume(second)
    (line,) = refused.value.lines
    assert f"step-00000002: written by the run {first.run_dir}, which has the same name" in line
    assert "nothing was started" in line
    assert preflight.check_resume(first) is not None  # its owner resumes as before
    # The first run's directory moved away: its checkpoints are the moved run's to continue.
    Path(first.run_dir).rename(tmp_path / "moved")
    assert preflight.check_resume(second) is not None


def test_checkpoints_that_all_failed_verification_refuse_a_fresh_start(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    root = RunDir.from_plan(plan).checkpoints
    for step in (2, 4):
        checkpoint.mark_corrupt(_save(plan, step))
    with pytest.raises(UserError) as refused:
        preflight.check_resume(plan)
    (line,) = refused.value.lines
    assert line == (
        f"{root}: no checkpoint passed verification (corrupt-step-00000002, corrupt-step-00000004, kept for "
        "inspection); nothing was started, and the run is refused until they are moved away "
        "(checkpoint.resume=never starts from step 0 beside them; another name starts a new run)"
    )
    # What the failed run said about running again agrees (launcher.run.launch prints it).
    assert "running the same recipe again is refused until they are moved away" in ownership.rerun(root)
    # The explicit fresh start, beside them.
    assert preflight.check_resume(_plan(tmp_path, "checkpoint.resume=never")) is None
    assert sorted(p.name for p in root.iterdir()) == [
        "corrupt-step-00000002",
        "corrupt-step-00000004",
        "latest",
    ]
