"""A save on a full disk, in one process with a fake backend: what it wrote is removed, the older
checkpoint is kept, and the error is ENOSPC naming the checkpoint folder (which train.main turns
into its one line). The disk fills in-process (the write raises OSError(ENOSPC) as the kernel
would); tests/e2e/test_disk_full.py fills a real tmpfs under a real run."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from launcher.plan.resolve import Plan
from launcher.rundir import checkpoint, space
from launcher.rundir.layout import RunDir
from launcher.worker import data, train
from tests.fake_loop import FakeBackend, loop_run, small_plan


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(small_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


class FillsTheDisk(FakeBackend):
    """Writes part of checkpoint `at`, then the disk is full (or is interrupted)."""

    def __init__(self, at: int, error: BaseException) -> None:
        super().__init__()
        self.at, self.error = at, error

    def save(self, directory: Path) -> None:
        super().save(directory)
        if self.steps == self.at:
            (directory / "shard.bin").write_bytes(b"x" * 4096)
            raise self.error


def _fit(plan: Plan, tokens: data.Tokens, backend: FakeBackend) -> BaseException:
    r = loop_run(plan, tokens, backend)
    try:
        with pytest.raises(BaseException) as raised:  # noqa: PT011 (each test checks what it is)
            train.fit(r)
    finally:
        r.meter.close()
    return raised.value


def _left(plan: Plan) -> list[str]:
    return sorted(p.name for p in RunDir.from_plan(plan).checkpoints.iterdir())


def _assert_step_2_kept(plan: Plan) -> None:
    root = RunDir.from_plan(plan).checkpoints
    assert _left(plan) == ["latest", "step-00000002"]  # no .tmp-step-00000004 on the full disk
    assert (root / "latest").read_text().strip() == "step-00000002"
    manifest = checkpoint.read_manifest(root / "step-00000002")
    names = [name for name, _ in checkpoint.listed(manifest)]
    assert checkpoint.check_checksums(root / "step-00000002", manifest, names) is None


def test_a_save_that_fills_the_disk_removes_what_it_wrote(tmp_path: Path, tokens: data.Tokens) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file named
    error = _fit(plan, tokens, FillsTheDisk(4, full))
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert error.filename == str(RunDir.from_plan(plan).checkpoints)  # the one line names the folder
    _assert_step_2_kept(plan)


def test_torch_s_pathless_write_error_on_a_nearly_full_disk_is_enospc_measured_before_the_cleanup(
    tmp_path: Path, tokens: data.Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3")
    tmp = checkpoint.tmp_dir(RunDir.from_plan(plan).checkpoints, 4)
    # Nearly full while the partial checkpoint is there; the cleanup frees plenty.
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000 if tmp.exists() else 10**9)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 0")
    error = _fit(plan, tokens, FillsTheDisk(4, torch_error))
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert error.__cause__ is torch_error
    _assert_step_2_kept(plan)


def test_the_same_torch_error_with_room_to_spare_is_not_called_a_full_disk(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3")
    torch_error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert _fit(plan, tokens, FillsTheDisk(4, torch_error)) is torch_error
    _assert_step_2_kept(plan)


def test_a_manifest_the_disk_has_no_room_for_leaves_nothing_behind(
    tmp_path: Path, tokens: data.Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3")
    real = checkpoint.write_atomic

    def write_atomic(path: Path, text: str) -> None:
        if path.name == checkpoint.MANIFEST and "00000004" in path.parent.name:
            real(path, text + " " * 10)  # the temporary file is written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)
    error = _fit(plan, tokens, FakeBackend())
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    _assert_step_2_kept(plan)


def test_a_save_abandoned_by_a_second_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = small_plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3")
    error: Any = _fit(plan, tokens, FillsTheDisk(4, KeyboardInterrupt()))
    assert isinstance(error, KeyboardInterrupt)
    _assert_step_2_kept(plan)
