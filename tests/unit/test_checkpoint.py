"""Checkpoint directories: sealing, pruning, finding the latest, crashes at every write (checksums too)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher.rundir import checkpoint, ownership
from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[2]


def _write_step(root: Path, step: int, keep: int = 3, payload: bytes | None = None) -> Path:
    tmp = checkpoint.begin(root, step)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "weights.bin").write_bytes(payload or os.urandom(4096))
    return checkpoint.commit(tmp, {**_MANIFEST, "step": step, "files": _checksums(tmp)}, keep)


_MANIFEST = {"world_size": 2, "backend": "deepspeed", "zero_stage": 2}


def _checksums(tmp: Path, world: int = 2) -> list[dict]:
    """The manifest's file list as the ranks make it: each hashes its share, rank 0 merges."""
    files = checkpoint.list_files(tmp)
    for rank in range(world):
        checkpoint.write_checksums(tmp, rank, checkpoint.share(files, rank, world))
    return checkpoint.merge_checksums(tmp, files)


def test_commit_seals_a_complete_directory_and_points_latest_at_it(tmp_path: Path) -> None:
    final = _write_step(tmp_path, 50)
    assert final.name == "step-00000050"
    assert (tmp_path / "latest").read_text().strip() == "step-00000050"
    assert checkpoint.read_manifest(final)["step"] == 50
    assert not list(tmp_path.glob(".tmp-*"))
    found = checkpoint.find_latest(tmp_path)
    assert found.path == final
    assert found.ignored == ()


def test_keep_prunes_the_oldest_but_never_what_latest_names(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _write_step(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000030", "step-00000040"]
    # A pointer naming an old checkpoint protects it from pruning.
    (tmp_path / "latest").write_text("step-00000030\n")
    checkpoint.prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000030", "step-00000040"]


def test_partial_directories_are_ignored_and_reported(tmp_path: Path) -> None:
    _write_step(tmp_path, 10)
    (tmp_path / "step-00000020").mkdir()  # no manifest: never sealed
    (tmp_path / ".tmp-step-00000030").mkdir()  # a write in progress when the process died
    (tmp_path / "step-00000040").mkdir()
    (tmp_path / "step-00000040" / "manifest.json").write_text('{"step": 4')  # torn manifest
    found = checkpoint.find_latest(tmp_path)
    assert found.path == tmp_path / "step-00000010"
    assert any("step-00000020: incomplete" in line for line in found.ignored)
    assert any(".tmp-step-00000030: interrupted write" in line for line in found.ignored)
    assert any("step-00000040: incomplete" in line for line in found.ignored)


def test_a_lagging_pointer_is_overruled_by_a_newer_complete_checkpoint(tmp_path: Path) -> None:
    _write_step(tmp_path, 10)
    _write_step(tmp_path, 20)
    (tmp_path / "latest").write_text("step-00000010\n")  # died between the rename and the pointer update
    assert checkpoint.find_latest(tmp_path).path == tmp_path / "step-00000020"


def test_an_empty_or_missing_directory_has_nothing_to_resume(tmp_path: Path) -> None:
    assert checkpoint.find_latest(tmp_path / "nope").path is None
    assert checkpoint.find_latest(tmp_path).path is None


def test_the_next_start_removes_what_interrupted_saves_left_and_restores_a_resaved_step(
    tmp_path: Path,
) -> None:
    first = _write_step(tmp_path, 10, payload=b"old")
    _write_step(tmp_path, 20)
    (tmp_path / ".tmp-step-00000030").mkdir()  # a save a second Ctrl-C or a kill abandoned
    (tmp_path / ".tmp-step-00000030" / "weights.bin").write_bytes(b"half")
    (tmp_path / ".tmp-del-step-00000005").mkdir()  # a deletion cut short
    (tmp_path / "latest.tmp").write_text("torn")
    # Re-saving step 10 died between its two renames: the sealed copy is only under its temporary name.
    first.rename(tmp_path / ".tmp-old-step-00000010")
    (tmp_path / "notes.txt").write_text("precious")
    removed = checkpoint.clear_leftovers(tmp_path)
    assert removed == [".tmp-del-step-00000005", ".tmp-step-00000030", "latest.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "notes.txt",
        "step-00000010",
        "step-00000020",
    ]
    assert (first / "deepspeed" / "weights.bin").read_bytes() == b"old"
    assert checkpoint.clear_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- runs sharing a checkpoint.dir


def test_a_checkpoint_dir_outside_the_run_directory_gives_each_run_its_own_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    assert RunDir.of(run, str(tmp_path / "shared")).checkpoints == tmp_path / "shared" / "a"
    assert RunDir.of(run, str(tmp_path / "shared")).shared == tmp_path / "shared"
    assert RunDir.of(run, "../../shared").checkpoints == run / "../../shared" / "a"
    # Inside the run directory the folder is the run's own already.
    for inside in ("ck", "ck/deeper", str(run / "abs")):
        assert RunDir.of(run, inside).checkpoints == run / inside
        assert RunDir.of(run, inside).shared is None
    assert RunDir.of(run).checkpoints == run / "checkpoints"


def _legacy_step(shared: Path, step: int, name: str) -> Path:
    """A checkpoint as mplaunch before per-run folders wrote it: straight into checkpoint.dir,
    its run named only by the recipe in its manifest."""
    tmp = checkpoint.begin(shared, step)
    (tmp / "weights.bin").write_bytes(name.encode() * 100)
    manifest = {**_MANIFEST, "step": step, "recipe": {"name": name}, "files": _checksums(tmp)}
    return checkpoint.commit(tmp, manifest, keep=10)


def test_an_older_shared_layout_still_resumes_and_moves_into_the_runs_folder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    for step, name in ((2, "a"), (4, "a"), (6, "b"), (8, "a")):
        _legacy_step(shared, step, name)
    checkpoint.mark_corrupt(shared / "step-00000008")  # a's newest failed verification once
    run = RunDir.of(tmp_path / "runs" / "a", str(shared))
    # Until the run starts again, report, export and --resume read a's checkpoints where they are.
    assert run.resume_point().path == shared / "step-00000004"
    assert run.checkpoint_steps() == [2, 4]
    assert RunDir.of(tmp_path / "runs" / "b", str(shared)).checkpoint_steps() == [6]
    moved = ownership.adopt(shared, run.checkpoints, "a")
    assert moved == ["corrupt-step-00000008", "step-00000002", "step-00000004"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == moved
    assert sorted(p.name for p in shared.iterdir()) == ["a", "latest", "step-00000006"]  # b's stays
    assert run.resume_point().path == run.checkpoints / "step-00000004"
    assert ownership.adopt(shared, run.checkpoints, "a") == []


def _owned_step(root: Path, step: int, run_dir: Path) -> Path:
    tmp = checkpoint.begin(root, step)
    (tmp / "weights.bin").write_bytes(b"w" * 100)
    manifest = {
        **_MANIFEST,
        "step": step,
        ownership.RUN_KEY: ownership.identity(run_dir),
        "files": _checksums(tmp),
    }
    return checkpoint.commit(tmp, manifest, keep=10)


def test_a_checkpoint_of_another_run_with_the_same_name_is_never_pruned_or_taken(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    mine, theirs = tmp_path / "x" / "same", tmp_path / "y" / "same"
    run = RunDir.of(mine, str(shared))
    assert run.checkpoints == RunDir.of(theirs, str(shared)).checkpoints  # the same name: one folder
    theirs.mkdir(parents=True)
    _owned_step(run.checkpoints, 2, theirs)
    for step in (4, 6, 8):
        _owned_step(run.checkpoints, step, mine)
    manifests = {p.name: m for p, m in checkpoint.newest_first(run.checkpoints)}
    assert run.foreign(manifests["step-00000002"]) == str(theirs)
    assert run.foreign(manifests["step-00000004"]) is None
    checkpoint.prune(run.checkpoints, keep=1, mine=lambda m: run.foreign(m) is None)
    assert sorted(p.name for p in run.checkpoints.glob("step-*")) == ["step-00000002", "step-00000008"]
    # A run directory that was moved away is no other run: its checkpoints are this one's.
    theirs.rmdir()
    assert run.foreign(manifests["step-00000002"]) is None
    # Inside the run directory nothing is checked: a copied run directory owns its copies.
    assert RunDir.of(mine).foreign(manifests["step-00000002"]) is None


@pytest.mark.parametrize("state", ["complete", "corrupt", "none"])
def test_the_rerun_hint_says_what_running_again_does(tmp_path: Path, state: str) -> None:
    if state != "none":
        _write_step(tmp_path, 4)
    if state == "corrupt":
        checkpoint.mark_corrupt(tmp_path / "step-00000004")
    hint = ownership.rerun(tmp_path)
    expected = {
        "complete": "running the same recipe again resumes from the latest complete one, step 4",
        "corrupt": "(corrupt-step-00000004, kept for inspection); running the same recipe again is refused until "
        "they are moved away",
        "none": "no checkpoint was saved in",
    }[state]
    assert expected in hint
    assert str(tmp_path) in hint


def test_resume_mismatch_names_what_differs() -> None:
    manifest = {"world_size": 2, "backend": "deepspeed", "zero_stage": 2}
    assert checkpoint.mismatch(manifest, dict(manifest)) == []
    lines = checkpoint.mismatch(manifest, {"world_size": 1, "backend": "deepspeed", "zero_stage": 3})
    assert lines == [
        "the checkpoint was written with world size 2, this run has 1",
        "the checkpoint was written with ZeRO stage 2, this run has 3",
    ]
    # The workers reshard a checkpoint of another world size; the stage still has to match.
    assert checkpoint.mismatch(
        manifest, {"world_size": 1, "backend": "deepspeed", "zero_stage": 3}, resizable=True
    ) == [
        "the checkpoint was written with ZeRO stage 2, this run has 3",
    ]


def test_changed_keys_are_dotted_paths() -> None:
    old = {"train": {"max_steps": 10, "seed": 1}, "backend": "deepspeed"}
    new = {"train": {"max_steps": 20, "seed": 1}, "backend": "deepspeed"}
    assert checkpoint.changed_keys(old, new) == ["train.max_steps"]


# --------------------------------------------------------------------------- crashes during a save

# Runs checkpoint.commit in a child process that dies (os._exit, as under SIGKILL: no cleanup)
# at its Nth file-system operation. CRASH_AT=0 counts the operations instead.
_CHILD = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path
    from launcher.rundir import checkpoint

    crash_at = int(os.environ["CRASH_AT"])
    count = 0

    def hook(name, real):
        def wrapped(*args, **kwargs):
            global count
            count += 1
            if count == crash_at:
                os._exit(9)
            return real(*args, **kwargs)
        return wrapped

    for name in ("rename", "replace", "fsync", "rmdir", "unlink"):
        setattr(os, name, hook(name, getattr(os, name)))
    shutil.rmtree = hook("rmtree", shutil.rmtree)

    root = Path(sys.argv[1])
    tmp = checkpoint.begin(root, 2)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "weights.bin").write_bytes(bytes.fromhex(sys.argv[2]))
    files = checkpoint.list_files(tmp)
    for rank in range(2):
        checkpoint.write_checksums(tmp, rank, checkpoint.share(files, rank, 2))
    manifest = {"step": 2, "world_size": 2, "backend": "deepspeed", "zero_stage": 2}
    checkpoint.commit(tmp, {**manifest, "files": checkpoint.merge_checksums(tmp, files)}, keep=1)
    print(count)
    """
)


def _run_child(root: Path, crash_at: int, payload: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), payload.hex()],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CRASH_AT": str(crash_at)},
        timeout=60,
    )


def test_a_crash_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    old_payload, new_payload = b"old" * 1000, b"new" * 1000
    counting = tmp_path / "count"
    _write_step(counting, 1, payload=old_payload)
    result = _run_child(counting, 0, new_payload)
    assert result.returncode == 0, result.stderr
    operations = int(result.stdout.strip())
    assert operations >= 8  # fsyncs, the rename, the pointer update and the pruning at least

    for crash_at in range(1, operations + 1):
        root = tmp_path / f"crash-{crash_at}"
        _write_step(root, 1, payload=old_payload)
        died = _run_child(root, crash_at, new_payload)
        assert died.returncode == 9, (crash_at, died.stderr)
        found = checkpoint.find_latest(root)
        assert found.path is not None, f"no complete checkpoint after a crash at operation {crash_at}"
        weights = (found.path / "deepspeed" / "weights.bin").read_bytes()
        expected = {1: old_payload, 2: new_payload}[found.manifest["step"]]
        assert hashlib.sha256(weights).digest() == hashlib.sha256(expected).digest(), crash_at
        names = [e["path"] for e in found.manifest["files"]]
        assert names == ["deepspeed/weights.bin"], crash_at  # no rank's partial checksum file
        assert checkpoint.check_checksums(found.path, found.manifest, names) is None, crash_at
        # The launcher's tidying before the next start removes what the crash left, and nothing else.
        checkpoint.clear_leftovers(root)
        assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-") or p.name == "latest.tmp"]
        assert checkpoint.find_latest(root).path == found.path, crash_at
        # The next save after the crash works and cleans up what the crash left behind.
        _write_step(root, 3, keep=1)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003"]
        assert json.loads((root / "step-00000003" / "manifest.json").read_text())["step"] == 3
