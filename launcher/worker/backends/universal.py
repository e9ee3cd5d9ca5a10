"""Loading a DeepSpeed checkpoint, at the world size that wrote it or at another one.

ZeRO 1-3 save each rank's partition of the fp32 master weights and optimizer state
(`*_optim_states.pt`), and DeepSpeed loads such a checkpoint only at the data-parallel size
that wrote it. Its answer to a new size is the universal checkpoint: `ds_to_universal` merges
the partitions into whole tensors per parameter (fp32 master, exp_avg, exp_avg_sq, step), and
an engine whose `checkpoint.load_universal` is set slices them for its own ranks. Here that
happens on resume, without the user:

    convert   rank 0 runs `ds_to_universal` once, in a subprocess (its memory is returned when
              it ends, and its worker pool starts from a clean process), into
              `step-N/.tmp-universal`, lists the files with their sizes and CRC-32s in that
              folder's manifest.json (the checkpoint's own format, plus the source files it was
              made from and the DeepSpeed version), and renames it `step-N/universal`; the
              other ranks wait at a barrier.
    reuse     a later resize of the same checkpoint (2 -> 1, then 2 -> 4 after a failure) loads
              the kept copy once every rank has verified its share of it; a copy that fails,
              or was made from other files or by another DeepSpeed, is rebuilt.
    load      `checkpoint.load_universal` is switched on for that one `load_checkpoint` and off
              again: DeepSpeed reads it only while loading, and the config the run trains with
              (the one the dry run prints) stays the plan's.

The step's manifest does not list the copy, so the checkpointer's verification (sizes and
checksums of the listed files) does not see it, and pruning deletes it with its step.

A stage-0 checkpoint is whole on every rank (the module, and the 16-bit optimizer's fp32 masters
in bf16/fp16, are in `mp_rank_00_model_states.pt`): it loads as saved at any size. So does any
checkpoint at the size that wrote it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.rundir import checkpoint
from launcher.rundir.watchdog import COLLECTIVE_MARGIN_S, STARTUP_S
from launcher.worker.backends import ReshardError

FOLDER = "universal"  # in the step directory, beside the backend's own folder
_TMP = ".tmp-" + FOLDER
_OPTIM_STATES = "*_optim_states.pt"  # ZeRO 1-3's per-rank partitions (bf16_ too)
_MAX_EXTRACT_WORKERS = 8  # ds_to_universal reads this many ranks' partitions at once
_MAX_MERGE_WORKERS = 4  # and merges this many parameters at once (each holds all its fragments)


def load_checkpoint(engine: Any, directory: Path, tag: str, saved_world: int) -> str | None:
    """Load the checkpoint `engine.save_checkpoint` wrote into `directory`/`tag` with `saved_world`
    ranks: as saved when nothing in it is partitioned by rank or the world size is the same, else
    through the universal checkpoint (converted, or verified and reused). Every rank calls it.

    Returns:
        A one-line note of the conversion (what, how long, where it is kept), else None.

    Raises:
        ReshardError: the conversion failed (the message names the world size that loads
            the checkpoint as it is).
        RuntimeError: DeepSpeed found no checkpoint.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    note, load_dir = None, directory
    if saved_world != world and partitioned(directory / tag):
        load_dir, note = _prepare(directory, tag, saved_world)
    with _reading_universal(engine, on=note is not None):
        path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {load_dir}")
    if note is not None:
        _own_step_counters(engine.optimizer)
        _load_buffers(engine.module, load_dir / tag)
    return note


def partitioned(ds_dir: Path) -> bool:
    """The checkpoint holds state split by data-parallel rank (ZeRO 1-3), which only the world
    size that wrote it can load as it is."""
    return any(ds_dir.glob(_OPTIM_STATES))


def _prepare(directory: Path, tag: str, saved_world: int) -> tuple[Path, str]:
    """Make sure `directory`/universal holds a verified universal copy of `directory`/`tag`, rank 0
    converting while the others wait; return the folder to load it from and the note."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    kept = directory / FOLDER
    where = f"{directory.name}/{FOLDER}"
    started = time.perf_counter()
    problem = _kept_problem(kept, _source(directory, tag), rank, world)
    group = _waiting_group()
    try:
        if not _any(problem is not None, group):
            return kept, f"reused DeepSpeed's universal checkpoint in {where} (verified in {_since(started)})"
        failure, seconds = None, 0.0
        if rank == 0:  # every rank reaches the agreement below, whatever happens here
            try:
                seconds = build(directory, tag, saved_world)
            except Exception as exc:
                failure = str(exc) if isinstance(exc, ReshardError) else _unexpected(exc, saved_world)
        if _any(failure is not None, group):
            raise ReshardError(failure or f"rank 0 could not convert {directory.name}; see its error")
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    seconds = seconds if rank == 0 else time.perf_counter() - started
    why = problem or "it failed verification on another rank"
    again = "" if problem == "none kept" else f"; the kept copy was rebuilt: {why}"
    return kept, f"converted to DeepSpeed's universal checkpoint in {seconds:.1f} s (kept in {where}){again}"


def build(directory: Path, tag: str, saved_world: int) -> float:
    """Convert checkpoint `directory`'s `tag` folder, written by `saved_world` ranks, into
    `directory`/universal, replacing any copy kept there; return the seconds it took (conversion
    and checksums). One process, no collectives: rank 0 at a resize, or a benchmark.

    Raises:
        ReshardError: the conversion failed or the copy cannot be written.
    """
    started = time.perf_counter()
    tmp, kept = directory / _TMP, directory / FOLDER
    for old in (tmp, kept):  # an interrupted conversion, or a copy that failed verification
        shutil.rmtree(old, ignore_errors=True)
    try:
        _convert(directory / tag, tmp / tag, directory.name, saved_world)
        entries = checkpoint.merge_checksums(tmp, checkpoint.list_files(tmp))  # no partials: hashes each
        import deepspeed

        manifest = {
            "format": checkpoint.FORMAT_VERSION,
            "checksum": checkpoint.CHECKSUM,
            "source": _source(directory, tag),
            "deepspeed": deepspeed.__version__,
            "saved_world": saved_world,
            "seconds": round(time.perf_counter() - started, 3),
            "files": entries,
        }
        checkpoint.write_atomic(tmp / checkpoint.MANIFEST, json.dumps(manifest, indent=2))
        tmp.rename(kept)
    except OSError as exc:
        raise ReshardError(
            f"cannot write DeepSpeed's universal checkpoint into {directory} ({exc.strerror or exc}); "
            + _instead(saved_world)
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failure left; renamed away on success
    return time.perf_counter() - started


def _convert(ds_dir: Path, out: Path, name: str, saved_world: int) -> None:
    """DeepSpeed's `ds_to_universal`, in a subprocess on the CPU.

    Raises:
        ReshardError: it failed; the message has its last line.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    command = [
        *(sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"),
        *("--input_folder", str(ds_dir), "--output_folder", str(out)),
        # mplaunch's engines record no universal_checkpoint_info (no tensor or pipeline parallelism):
        # the converter then assumes plain data parallelism, which is what they run.
        "--inject_missing_state",
        *("--num_extract_workers", str(max(1, min(saved_world, cpus, _MAX_EXTRACT_WORKERS)))),
        *("--num_merge_workers", str(max(1, min(cpus, _MAX_MERGE_WORKERS)))),
    ]
    # The merge reads CPU tensors only: no GPU is touched, whatever the run trains on.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = lines[-1].strip()[:300] if lines else f"exit status {done.returncode}"
        raise ReshardError(
            f"DeepSpeed's ds_to_universal could not convert {name} ({last}); {_instead(saved_world)}"
        )


def _kept_problem(kept: Path, source: list[dict[str, Any]], rank: int, world: int) -> str | None:
    """Why the kept universal copy cannot be used (this rank's share of its checksums), or None."""
    if not (kept / checkpoint.MANIFEST).is_file():
        return "none kept"
    try:
        manifest = checkpoint.read_manifest(kept)
        import deepspeed

        if manifest.get("deepspeed") != deepspeed.__version__:
            return f"made by DeepSpeed {manifest.get('deepspeed')}, this is {deepspeed.__version__}"
        if manifest.get("source") != source:
            return "made from other files than the checkpoint's"
        names = checkpoint.share(checkpoint.listed(manifest), rank, world)
        return checkpoint.check_sizes(kept, manifest) or checkpoint.check_checksums(kept, manifest, names)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {checkpoint.MANIFEST} cannot be read ({exc})"


def _source(directory: Path, tag: str) -> list[dict[str, Any]]:
    """What the copy is made from: the step manifest's entries of the backend's files (their
    sizes and checksums), or, in a checkpoint without checksums, their names and sizes."""
    try:
        entries = checkpoint.read_manifest(directory)["files"]
        listed = [e for e in entries if str(e["path"]).startswith(f"{tag}/")]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    if listed:
        return listed
    return [{"path": f"{tag}/{n}", "size": s} for n, s in checkpoint.list_files(directory / tag)]


@contextlib.contextmanager
def _reading_universal(engine: Any, on: bool) -> Iterator[None]:
    """DeepSpeed's `checkpoint.load_universal` for one load: the engine reads it only in
    `load_checkpoint` (engine.load_universal_checkpoint()), never while training or saving. Its
    loader's warning that no model-parallel unit was given (none is: mplaunch runs data parallel
    only) is kept off the console."""
    from deepspeed.utils import logger

    config = engine._config
    before, level = config.load_universal_checkpoint, logger.level
    config.load_universal_checkpoint = on or before
    if on:
        logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
        logger.setLevel(level)


def _own_step_counters(optimizer: Any) -> None:
    """DeepSpeed's ZeRO-3 universal loader hands every parameter group one and the same `step`
    tensor, which torch's Adam advances in place once per group: the second group's bias correction
    would count two steps per step. Each group gets its own copy."""
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_buffers(module: torch.nn.Module, ds_dir: Path) -> None:
    """The module's buffers as saved: the universal loader restores parameters only (from their
    fp32 masters), and a model's buffers (a running statistic, a step counter) are state too.
    ZeRO 1-2 save the module once, ZeRO-3 once per rank with its buffers whole in each."""
    files = sorted(ds_dir.glob("*model_states.pt"))
    if not files:
        return
    saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True).get("module") or {}
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved and saved[name].shape == buffer.shape:
                buffer.copy_(saved[name])


def _waiting_group() -> Any:
    """A gloo group whose barrier outlasts a long conversion: rank 0 may convert for many minutes
    while the others wait. Longer than the launcher's allowance for a rank's setup, so that a
    conversion that never ends is reported by its hang watch (with stacks), not as a timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=STARTUP_S + COLLECTIVE_MARGIN_S))


def _any(flag: bool, group: Any) -> bool:
    """True on every rank if `flag` is true on any rank (the barrier the waiting ranks pass)."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _instead(saved_world: int) -> str:
    return (
        f"resume on {saved_world} ranks (launch.nnodes x launch.nproc_per_node), the world size that "
        "wrote it, which loads it as it is"
    )


def _unexpected(exc: Exception, saved_world: int) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0][:300] if lines else "no message"
    return (
        f"converting to DeepSpeed's universal checkpoint failed ({type(exc).__name__}: {first}); "
        + _instead(saved_world)
    )


def _since(started: float) -> str:
    return f"{time.perf_counter() - started:.1f} s"
