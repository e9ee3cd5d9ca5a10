"""Verified checkpoint directories, without a run: every file checksummed in the manifest by one
rank, a bad checkpoint skipped for an older one (renamed and kept), pruning that deletes only what
it wrote."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from launcher.rundir import checkpoint
from tests.faults import flip_bytes, truncate


def _save(root: Path, step: int, files: dict[str, bytes], world: int = 2, keep: int = 3) -> Path:
    """Checkpoint `step` written as the ranks write it: files, each rank's share hashed, merged, sealed."""
    tmp = checkpoint.begin(root, step)
    for name, content in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)
    listing = checkpoint.list_files(tmp)
    for rank in range(world):
        checkpoint.write_checksums(tmp, rank, checkpoint.share(listing, rank, world))
    manifest = {"step": step, "world_size": world, "backend": "deepspeed", "zero_stage": 2}
    return checkpoint.commit(tmp, {**manifest, "files": checkpoint.merge_checksums(tmp, listing)}, keep)


def _files(rng: random.Random) -> dict[str, bytes]:
    return {
        "deepspeed/mp_rank_00_model_states.pt": rng.randbytes(rng.randrange(3000, 9000)),
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": rng.randbytes(rng.randrange(3000, 9000)),
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": rng.randbytes(rng.randrange(3000, 9000)),
        "rng-rank0.pt": rng.randbytes(300),
        "rng-rank1.pt": rng.randbytes(300),
        "empty": b"",
    }


def _worker_view(root: Path, world: int = 2) -> Path | None:
    """What the workers resume from (the order of launcher.worker.checkpointer.restore, with the
    checkpoint functions it calls): newest first, sizes and every rank's share of the
    checksums checked, a bad one renamed corrupt."""
    for path, manifest in checkpoint.newest_first(root):
        problem = checkpoint.check_sizes(path, manifest)
        for rank in range(world):
            names = checkpoint.share(checkpoint.listed(manifest), rank, world)
            problem = problem or checkpoint.check_checksums(path, manifest, names)
        if problem is None:
            return path
        checkpoint.mark_corrupt(path)
    return None


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path: Path) -> None:
    files = _files(random.Random(1))
    final = _save(tmp_path, 2, files)
    manifest = checkpoint.read_manifest(final)
    assert manifest["format"] == checkpoint.FORMAT_VERSION == 2
    assert manifest["checksum"] == "crc32"
    sizes = sorted((name, len(content)) for name, content in files.items())
    assert [(e["path"], e["size"]) for e in manifest["files"]] == sizes
    # The ranks' partial files were merged and deleted; nothing but the content and the manifest is left.
    on_disk = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert on_disk == sorted([*files, "manifest.json"])
    assert checkpoint.check_checksums(final, manifest, list(files)) is None


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_file_is_hashed_by_exactly_one_rank_and_the_bytes_are_spread(world: int) -> None:
    files = [(f"f{i}", size) for i, size in enumerate([900, 10, 500, 500, 400, 0, 0, 1, 7000, 30])]
    shares = [checkpoint.share(files, rank, world) for rank in range(world)]
    assert sorted(n for s in shares for n in s) == sorted(n for n, _ in files)
    assert shares == [checkpoint.share(list(reversed(files)), rank, world) for rank in range(world)]
    sizes = dict(files)
    loads = [sum(sizes[n] for n in s) for s in shares]
    assert max(loads) <= max(7000, sum(sizes.values()) // world + 900)


def test_a_file_no_rank_hashed_is_hashed_by_rank_0_when_merging(tmp_path: Path) -> None:
    tmp = checkpoint.begin(tmp_path, 2)
    (tmp / "a").write_bytes(b"a" * 100)
    (tmp / "b").write_bytes(b"b" * 10)
    checkpoint.write_checksums(tmp, 0, ["a"])  # rank 1 saw no "b" (a stale listing)
    entries = checkpoint.merge_checksums(tmp, checkpoint.list_files(tmp))
    assert [e["path"] for e in entries] == ["a", "b"]
    assert entries[1] == {"path": "b", "size": 10, "crc32": checkpoint.checksum(tmp / "b")[1]}
    assert checkpoint.list_files(tmp) == [("a", 100), ("b", 10)]


@pytest.mark.parametrize("fault", ["truncate", "delete"])
def test_the_launcher_skips_a_checkpoint_with_a_missing_or_resized_file(tmp_path: Path, fault: str) -> None:
    rng = random.Random(2)
    _save(tmp_path, 2, _files(rng))
    newest = _save(tmp_path, 4, _files(rng))
    shard = newest / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncate(shard) if fault == "truncate" else shard.unlink()
    found = checkpoint.find_latest(tmp_path)
    assert found.path == tmp_path / "step-00000002"
    name = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    reason = f"{name} is missing" if fault == "delete" else f"{name} is "
    assert len(found.ignored) == 1, found.ignored
    assert found.ignored[0].startswith(f"step-00000004: {reason}"), found.ignored


def test_a_flipped_byte_passes_the_size_check_and_fails_the_checksum(tmp_path: Path) -> None:
    final = _save(tmp_path, 2, _files(random.Random(3)))
    flip_bytes(final / "deepspeed" / "mp_rank_00_model_states.pt", count=1)
    manifest = checkpoint.read_manifest(final)
    assert checkpoint.check_sizes(final, manifest) is None
    problem = checkpoint.check_checksums(final, manifest, [e["path"] for e in manifest["files"]])
    assert problem is not None
    assert problem.startswith("deepspeed/mp_rank_00_model_states.pt: crc32 ")
    assert f"expected {manifest['files'][0]['crc32']}" in problem


def test_old_format_checkpoints_without_a_file_list_still_resume(tmp_path: Path) -> None:
    tmp = checkpoint.begin(tmp_path, 2)
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    old = {"step": 2, "format": 1, "world_size": 2, "backend": "deepspeed", "zero_stage": 2}
    checkpoint.write_atomic(tmp / "manifest.json", json.dumps(old))
    tmp.rename(tmp_path / "step-00000002")
    found = checkpoint.find_latest(tmp_path)
    assert found.path == tmp_path / "step-00000002"
    assert found.manifest is not None
    assert not checkpoint.verified(found.manifest)
    assert found.ignored == ()


def test_pruning_in_a_shared_folder_deletes_only_what_it_wrote(tmp_path: Path) -> None:
    mine = (".tmp-step-00000009", ".tmp-old-step-00000002", ".tmp-del-step-00000001")
    theirs = (
        ".tmp-important",
        ".tmp-step-backup",
        "step-important",
        "step-00000001.bak",
        "corrupt-step-00000003",
    )
    for name in (*mine, *theirs):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("precious")
    (tmp_path / "step-important" / "manifest.json").write_text('{"step": 1}')
    (tmp_path / "latest.tmp").write_text("torn")
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / ".tmp-file").write_text("precious")
    rng = random.Random(4)
    for step in (2, 4, 6):
        _save(tmp_path, step, _files(rng), keep=1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*theirs, "notes.txt", ".tmp-file", "latest", "step-00000006"])
    assert all((tmp_path / name / "data").read_text() == "precious" for name in theirs)
    found = checkpoint.find_latest(tmp_path)
    assert found.path == tmp_path / "step-00000006"
    kept = "corrupt-step-00000003: failed verification on an earlier resume, kept for inspection"
    assert found.ignored == (kept,)


def test_a_corrupt_checkpoint_is_renamed_kept_and_never_counts(tmp_path: Path) -> None:
    rng = random.Random(5)
    _save(tmp_path, 2, _files(rng))
    newest = _save(tmp_path, 4, _files(rng))
    flip_bytes(newest / "rng-rank1.pt")
    assert checkpoint.find_latest(tmp_path).path == newest  # a flip is for the workers to find
    assert _worker_view(tmp_path) == tmp_path / "step-00000002"
    assert (tmp_path / "corrupt-step-00000004" / "rng-rank1.pt").is_file()
    _save(tmp_path, 4, _files(rng), keep=1)
    _save(tmp_path, 6, _files(rng), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt-step-00000004", "latest", "step-00000006"]


@pytest.mark.parametrize("trial", range(40))
def test_a_random_fault_ends_in_an_intact_checkpoint_or_none(tmp_path: Path, trial: int) -> None:
    rng = random.Random(1000 + trial)
    written = {step: _files(rng) for step in (2, 4, 6)}
    for step, files in written.items():
        _save(tmp_path, step, files)
    broken: set[int] = set()
    for _ in range(rng.choice([1, 1, 2, 3])):
        step = rng.choice(sorted(written))
        name = rng.choice(sorted(written[step]))
        path = checkpoint.step_dir(tmp_path, step) / name
        fault = rng.choice(["flip", "truncate", "delete"])
        if fault == "flip" and path.stat().st_size:
            flip_bytes(path, rng, count=rng.choice([1, 64]))
        elif fault == "truncate" and path.stat().st_size:
            truncate(path)
        elif fault == "delete":
            path.unlink()
        else:
            continue  # an empty file cannot be flipped or truncated
        broken.add(step)
    chosen = _worker_view(tmp_path)
    intact = sorted(set(written) - broken)
    if not intact:
        assert chosen is None  # a clear refusal, never a checkpoint with a broken file
        return
    assert chosen == checkpoint.step_dir(tmp_path, intact[-1])
    for name, content in written[intact[-1]].items():
        assert (chosen / name).read_bytes() == content
    assert sorted(p.name for p in tmp_path.glob("corrupt-*")) == [
        f"corrupt-step-{s:08d}" for s in sorted(broken) if s > intact[-1]
    ]
