"""Verified checkpoints: every file checksummed in the manifest, bad checkpoints skipped for older
ones (and kept as corrupt-step-N), pruning that deletes only its own names, and parameters that
must be finite before a step is sealed.

The first half works on checkpoint directories alone (no training); the second half breaks the
checkpoints of real 2-rank runs of the tiny recipe as a user would, through `mplaunch`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from launcher.plan.resolve import Plan
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir
from launcher.worker import data, train
from launcher.worker.checkpointer import Checkpointer, parameter_square_sum
from launcher.worker.metrics import Meter
from tests.runs import FAST, FAST_USER_MODEL, explain, losses, mplaunch, records, write_recipe
from tests.e2e.test_resume import _assert_bitwise_equal
from tests.worker.test_worker_loop import FakeBackend, _plan, _run

# --------------------------------------------------------------------------- checkpoint directories


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


def _flip(path: Path, rng: random.Random | None = None, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = (rng or random.Random(0)).randrange(0, max(1, len(data) - count))
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


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
    _truncate(shard) if fault == "truncate" else shard.unlink()
    found = checkpoint.find_latest(tmp_path)
    assert found.path == tmp_path / "step-00000002"
    name = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    reason = f"{name} is missing" if fault == "delete" else f"{name} is "
    assert len(found.ignored) == 1, found.ignored
    assert found.ignored[0].startswith(f"step-00000004: {reason}"), found.ignored


def test_a_flipped_byte_passes_the_size_check_and_fails_the_checksum(tmp_path: Path) -> None:
    final = _save(tmp_path, 2, _files(random.Random(3)))
    _flip(final / "deepspeed" / "mp_rank_00_model_states.pt", count=1)
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
    _flip(newest / "rng-rank1.pt")
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
            _flip(path, rng, count=rng.choice([1, 64]))
        elif fault == "truncate" and path.stat().st_size:
            _truncate(path)
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


# --------------------------------------------------------------------------- parameters fit to save


def _holding(*values: float, ds_tensor: bool = False) -> SimpleNamespace:
    model = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))
    if ds_tensor:  # as ZeRO-3: the parameter itself is empty, the rank's partition is ds_tensor
        weight = model.weight
        # One rank holds it all, padded to a partition size as ZeRO-3 pads, with garbage there.
        part = torch.cat([weight.data.clone().flatten(), torch.full((3,), float("nan"))])
        part.ds_numel = part.numel()  # type: ignore[attr-defined]
        weight.ds_tensor = part  # type: ignore[attr-defined]
        weight.ds_numel = len(values)  # type: ignore[attr-defined]
        weight.data = torch.empty(0)
    return SimpleNamespace(model=model)


@pytest.mark.parametrize("ds_tensor", [False, True])
def test_the_parameter_check_catches_nan_inf_and_weights_beyond_1e19(ds_tensor: bool) -> None:
    # With ds_tensor the partition's NaN padding (uninitialised memory in ZeRO-3) is left out.
    assert parameter_square_sum(_holding(3.0, 4.0, ds_tensor=ds_tensor)) == pytest.approx(25.0)
    assert parameter_square_sum(_holding(1e18, -1e18, ds_tensor=ds_tensor)) == pytest.approx(2e36, rel=1e-5)
    for bad in (float("nan"), float("inf"), -float("inf"), 1e20, 1e37):
        square_sum = parameter_square_sum(_holding(1.0, bad, ds_tensor=ds_tensor))
        assert not torch.isfinite(torch.tensor(square_sum)), bad


def test_the_parameter_check_reads_16_bit_parameters_in_fp32() -> None:
    backend = _holding(*[300.0] * 100_000)  # a norm of about 95000: past fp16's largest number
    backend.model.to(torch.float16)
    assert parameter_square_sum(backend) == pytest.approx(9e9, rel=1e-3)
    backend = _holding(3e18, 3e18)
    backend.model.to(torch.bfloat16)
    assert torch.isfinite(torch.tensor(parameter_square_sum(backend)))
    backend = _holding(3e19, 1.0)
    backend.model.to(torch.bfloat16)
    assert not torch.isfinite(torch.tensor(parameter_square_sum(backend)))


# --------------------------------------------------------------------------- the checkpointer in one process


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> data.Tokens:
    return data.load_tokens(_plan(tmp_path_factory.mktemp("tokens")), 0, lambda: None)


def _trained(tmp_path: Path, tokens: data.Tokens, steps: int = 4) -> Plan:
    """A plan whose run sealed checkpoints at steps 2 and 4 (world size 1, a fake backend)."""
    plan = _plan(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=3", f"train.max_steps={steps}")
    r = _run(plan, tokens, FakeBackend())
    try:
        assert train.fit(r) == train.EXIT_OK
    finally:
        r.meter.close()
    return plan


def _restore(plan: Plan, backend: FakeBackend) -> tuple[Checkpointer, int]:
    ckpt = Checkpointer(plan, RunDir.from_plan(plan), train.Dist(rank=0, world=1, local_rank=0, control=None))
    return ckpt, ckpt.restore(backend)  # type: ignore[arg-type]


def test_restore_falls_back_past_a_bad_checkpoint_and_reports_it(
    tmp_path: Path, tokens: data.Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _trained(tmp_path, tokens)
    root = RunDir.from_plan(plan).checkpoints
    _flip(root / "step-00000004" / "fake.json", count=1)
    backend = FakeBackend()
    ckpt, start = _restore(plan, backend)
    assert start == 2
    assert backend.calls == [("load", "step-00000002")]  # the bad one was never loaded
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1
    assert said[0].startswith("mplaunch: warning: checkpoint step-00000004 failed verification on rank 0: ")
    assert "fake.json: crc32 " in said[0]
    assert (root / "corrupt-step-00000004" / "rejected-by-rank-0.txt").is_file()
    meter = Meter(plan, True, start)
    ckpt.report(meter)
    meter.close()
    rejected = [r for r in records(Path(plan.run_dir), "event") if r["event"] == "checkpoint_rejected"]
    assert [(r["step"], r["path"]) for r in rejected] == [(4, str(root / "corrupt-step-00000004"))]


def test_a_checkpoint_that_verifies_but_does_not_load_is_skipped(
    tmp_path: Path, tokens: data.Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    class Unloadable(FakeBackend):
        def load(self, directory: Path) -> None:
            if directory.name == "step-00000004":
                raise RuntimeError("PytorchStreamReader failed reading zip archive\n(a long torch error)")
            super().load(directory)

    plan = _trained(tmp_path, tokens)
    _, start = _restore(plan, Unloadable())
    assert start == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [
        "mplaunch: warning: checkpoint step-00000004 failed verification on rank 0: cannot be loaded "
        "(RuntimeError: PytorchStreamReader failed reading zip archive); renamed to corrupt-step-00000004, "
        "trying an older checkpoint"
    ]


def test_with_every_checkpoint_bad_restore_refuses_instead_of_starting_afresh(
    tmp_path: Path, tokens: data.Tokens
) -> None:
    plan = _trained(tmp_path, tokens)
    root = RunDir.from_plan(plan).checkpoints
    for step in (2, 4):
        _truncate(checkpoint.step_dir(root, step) / "rng-rank0.pt")
    with pytest.raises(ValueError, match="passed verification") as refused:
        _restore(plan, FakeBackend())
    assert "nothing was started" in str(refused.value)
    assert sorted(p.name for p in root.glob("corrupt-*")) == [
        "corrupt-step-00000002",
        "corrupt-step-00000004",
    ]


# --------------------------------------------------------------------------- real runs, broken checkpoints

STEPS = 4
MODEL_FILE = "deepspeed/mp_rank_00_model_states.pt"
SHARD_1 = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
SHARED = {".tmp-important/data": "precious", "notes.txt": "precious", "step-important/data": "precious"}


@pytest.fixture(autouse=True)
def _deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which sets these on import.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, run directory) of a finished 4-step run with checkpoints at steps 2 and 4, kept in a
    checkpoint.dir it shares with files of someone else's; every test breaks a copy of it."""
    tmp = tmp_path_factory.mktemp("integrity")
    layer = {"train": {"max_steps": STEPS}, "checkpoint": {"every_steps": 2, "keep": 3, "dir": "shared"}}
    recipe = write_recipe(tmp, "base", FAST, layer)
    run_dir = tmp / "runs" / "base"
    for name, text in SHARED.items():
        (run_dir / "shared" / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "shared" / name).write_text(text)
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    assert sorted(p.name for p in (run_dir / "shared").glob("step-0*")) == ["step-00000002", "step-00000004"]
    return recipe, run_dir


def _copy(base: tuple[Path, Path], name: str) -> Path:
    run_dir = base[1].parent / name
    shutil.copytree(base[1], run_dir)
    (run_dir / "FINISHED").unlink()  # so that the same recipe trains again from its checkpoints
    return run_dir


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "shared" / f"step-{step:08d}"


def _resume(base: tuple[Path, Path], name: str, *overrides: str) -> subprocess.CompletedProcess:
    return mplaunch(str(base[0]), f"name={name}", *overrides)


def _warnings(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def _assert_shared_files_survive(run_dir: Path) -> None:
    for name, text in SHARED.items():
        assert (run_dir / "shared" / name).read_text() == text, name


@pytest.mark.slow
def test_flipped_bytes_in_the_newest_model_file_fall_back_to_the_older_checkpoint(
    base: tuple[Path, Path],
) -> None:
    run_dir = _copy(base, "flipped")
    _flip(_ckpt(run_dir, 4) / MODEL_FILE)
    result = _resume(base, "flipped", "checkpoint.keep=1")
    assert result.returncode == 0, explain(result)
    said = _warnings(result.stderr, "failed verification")
    assert len(said) == 1, explain(result)
    assert "checkpoint step-00000004 failed verification on rank " in said[0]
    assert f"{MODEL_FILE}: crc32 " in said[0]
    assert ", expected " in said[0]
    assert "training from step 2 to 4" in result.stdout
    # Steps 3 and 4 again, exactly as the uninterrupted run had them.
    assert losses(run_dir) == losses(base[1])
    _assert_bitwise_equal(_ckpt(run_dir, 4), _ckpt(base[1], 4))
    # keep=1 pruned step 2 once the new step 4 was sealed; the corrupt one and the neighbours stay.
    assert sorted(p.name for p in (run_dir / "shared").iterdir() if not p.name.startswith(".tmp-imp")) == [
        "corrupt-step-00000004",
        "latest",
        "notes.txt",
        "step-00000004",
        "step-important",
    ]
    _assert_shared_files_survive(run_dir)


@pytest.mark.slow
def test_a_truncated_model_file_is_skipped_by_the_launcher_and_the_workers(base: tuple[Path, Path]) -> None:
    run_dir = _copy(base, "truncated")
    _truncate(_ckpt(run_dir, 4) / MODEL_FILE)
    result = _resume(base, "truncated")
    assert result.returncode == 0, explain(result)
    skipped = _warnings(result.stderr, "ignored, trying an older one")
    assert len(skipped) == 1, explain(result)
    assert f"step-00000004: {MODEL_FILE} is " in skipped[0]
    assert "resuming from step 2" in result.stdout
    assert losses(run_dir) == losses(base[1])
    assert (run_dir / "shared" / "corrupt-step-00000004").is_dir()
    _assert_shared_files_survive(run_dir)


@pytest.mark.slow
def test_with_no_intact_checkpoint_left_the_run_refuses_in_one_line(base: tuple[Path, Path]) -> None:
    run_dir = _copy(base, "refused")
    (_ckpt(run_dir, 4) / SHARD_1).unlink()  # one rank's optimizer shard deleted
    _flip(_ckpt(run_dir, 2) / SHARD_1)
    before = records(run_dir, "train")
    result = _resume(base, "refused")
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr
    failed = _warnings(result.stderr, "the run failed on")
    assert len(failed) == 1
    assert "passed verification" in failed[0]
    assert "nothing was started" in failed[0]
    assert len(_warnings(result.stderr, "failed verification on rank")) == 2
    assert records(run_dir, "train") == before  # no fresh start over the user's checkpoints
    assert sorted(p.name for p in (run_dir / "shared").glob("corrupt-*")) == [
        "corrupt-step-00000002",
        "corrupt-step-00000004",
    ]


@pytest.mark.slow
def test_a_random_fault_in_a_random_checkpoint_ends_in_a_correct_resume(base: tuple[Path, Path]) -> None:
    rng = random.Random(7)
    run_dir = _copy(base, "fault")
    step = rng.choice([2, 4])
    manifest = checkpoint.read_manifest(_ckpt(run_dir, step))
    name = rng.choice([e["path"] for e in manifest["files"]])
    fault = rng.choice(["flip", "truncate", "delete"])
    target = _ckpt(run_dir, step) / name
    if fault == "flip":
        _flip(target, rng)
    elif fault == "truncate":
        _truncate(target)
    else:
        target.unlink()
    result = _resume(base, "fault")
    assert result.returncode == 0, (step, name, fault, explain(result))
    assert f"finished {STEPS} steps" in result.stdout
    assert losses(run_dir) == losses(base[1]), (step, name, fault)


def _never_sealed(tmp: Path, name: str, *layers: dict, fast: dict = FAST) -> tuple[str, Path]:
    result = mplaunch(str(write_recipe(tmp, name, fast, *layers)))
    assert result.returncode == 1, explain(result)
    assert "Traceback" not in result.stderr
    failed = _warnings(result.stderr, "the run failed on")
    assert len(failed) == 1, explain(result)
    return failed[0], tmp / "runs" / name / "checkpoints"


@pytest.mark.slow
def test_absurd_weights_from_a_huge_learning_rate_are_never_sealed(tmp_path: Path) -> None:
    # Step 1's weights are about 1e36: finite in fp32, the loss of step 1 is still fine.
    layer = {"optimizer": {"lr": 1e37}, "train": {"max_steps": 2}, "checkpoint": {"every_steps": 1}}
    line, root = _never_sealed(tmp_path, "huge", layer)
    assert "the parameters after step 1 are not finite" in line
    assert "nothing was saved and no earlier checkpoint exists" in line
    assert not list(root.glob("step-*"))
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_nan_weights_behind_a_finite_loss_are_never_sealed(tmp_path: Path) -> None:
    poisoned = {
        "backend": "accelerate",
        "model": {
            "name": None,
            "target": "poison_model:build",
            "kwargs": {"vocab_size": 512, "poison_step": 4, "accum": 2},
        },
        "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
        "train": {"max_steps": 4},
        "checkpoint": {"every_steps": 2},
    }
    line, root = _never_sealed(tmp_path, "poisoned", poisoned, fast=FAST_USER_MODEL)
    assert "the parameters after step 4 are not finite" in line
    assert "the last complete checkpoint, step 2, is kept" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert os.path.getsize(root / "latest") > 0
