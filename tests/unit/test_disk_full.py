"""A full disk at every write the launcher makes: one line, no traceback, no temporary file left.

The disk is made full in-process: the write raises OSError(ENOSPC) as the kernel would (a real
tmpfs needs root and a mount; tests/e2e/test_disk_full.py runs a real training on one). The
checkpointer's saves on a full disk are tested in tests/worker/test_disk_full.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.run import preflight
from launcher.rundir import checkpoint, layout, lock, space
from launcher.rundir.layout import RunDir, is_secondary
from launcher.rundir.lock import RunLock

ROOT = Path(__file__).resolve().parents[2]


def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _plan(tmp_path: Path) -> Plan:
    overrides = [f"logging.dir={tmp_path}", "data.kind=synthetic", "data.paths=[]", "launch.nproc_per_node=1"]
    return resolve(load(ROOT / "recipes" / "bert_tiny.yaml", overrides), Hardware(cpu_count=2))


def _one_line(err: UserError, path: Path) -> str:
    assert len(err.lines) == 1
    line = err.lines[0]
    assert line.startswith(f"no space left on device: {path} ("), line
    assert "bytes free); nothing was started: free space there" in line
    return line


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "plan.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", _full)
    with pytest.raises(OSError, match="No space left") as raised:
        checkpoint.write_atomic(target, "new")
    assert raised.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_json_on_a_full_disk_is_one_line_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path)
    run = RunDir.from_plan(plan)
    run.path.mkdir(parents=True)
    run.plan_file.write_text("the earlier plan")
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: _full() if os.fstat(fd).st_size else real(fd))
    with pytest.raises(UserError) as refused:
        preflight.prepare_run_dir(plan)
    _one_line(refused.value, run.plan_file)
    assert run.plan_file.read_text() == "the earlier plan"
    assert not list(run.path.glob("*.tmp"))


def test_the_lock_on_a_full_disk_is_one_line_and_leaves_it_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run" / ".lock"
    monkeypatch.setattr(lock, "_write", _full)
    with pytest.raises(UserError) as refused:
        RunLock.acquire(path)
    _one_line(refused.value, path)
    monkeypatch.undo()
    with RunLock.acquire(path):  # the failed start holds nothing
        pass


def test_a_quota_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^disk quota exceeded: /x/y \("), space.refused_when_full(tmp_path):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/x/y")
    with pytest.raises(PermissionError), space.refused_when_full(tmp_path):  # other errors pass through
        raise PermissionError(errno.EACCES, "denied", "/x/y")


def test_an_error_report_on_a_full_disk_keeps_its_line_or_leaves_no_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.of(tmp_path / "run")
    real = Path.write_text

    def room_for(limit: int) -> Any:
        def write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
            real(self, "")  # the file is created, as open() creates it before the write fails
            if len(text) > limit:
                _full()
            return real(self, text, *args, **kwargs)

        return write_text

    monkeypatch.setattr(Path, "write_text", room_for(100))
    assert run.write_rank_error(0, "no space left on device: /ckpt (0 bytes free)", "Traceback\n" * 50)
    assert run.rank_error(0).read_text() == "no space left on device: /ckpt (0 bytes free)\n"
    monkeypatch.setattr(Path, "write_text", room_for(0))
    assert run.write_rank_error(1, "no space left on device: /ckpt (0 bytes free)", "Traceback") is None
    assert not run.rank_error(1).exists()  # no 0-byte report hiding the line the rank printed
    assert [e.rank for e in run.rank_errors()] == [0]


@pytest.mark.parametrize(
    "message",
    [
        "RuntimeError: Parent directory /ck/.tmp-step-00000004 does not exist.",
        "FileNotFoundError: [Errno 2] No such file or directory: '/ck/.tmp-step-00000004/rng-rank1.pt'",
    ],
)
def test_a_rank_that_finds_the_save_directory_gone_reports_a_consequence(message: str) -> None:
    # Another rank's failed save removed it; the cause is that rank's error (a full disk).
    assert is_secondary(message)
    assert not is_secondary("no space left on device: /ck/.tmp-step-00000004 (0 bytes free)")
    assert layout.cause(
        [
            layout.RankError(1, message, Path("rank-1.err")),
            layout.RankError(0, "no space left on device: /ck (0 bytes free)", Path("rank-0.err")),
        ]
    ) == layout.RankError(0, "no space left on device: /ck (0 bytes free)", Path("rank-0.err"))


def test_a_full_disk_while_the_launcher_tidies_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path)
    run = RunDir.from_plan(plan)
    monkeypatch.setattr(checkpoint, "clear_leftovers", _full)
    with pytest.raises(UserError) as refused:
        preflight.check_resume(plan)
    _one_line(refused.value, run.checkpoints)
