"""The worker's checkpointer: when to save, what to save, sealing, verifying, pruning and restoring.

The loop asks `due(step, stopping)`, calls `save(...)` and, once, `restore(...)`;
everything else about checkpoints happens here. Each rank writes its backend
shards and its RNG state into the temporary directory launcher.rundir.checkpoint
hands out, then checksums its share of the files; rank 0 merges the checksums
into the manifest (step, data position, structure, the resolved recipe, every
file, the run that wrote it) and seals it. A save that fails (a full disk)
removes what it wrote. A checkpoint of a diverged run (a non-finite loss or
non-finite parameters) is never sealed. A restore verifies the checksums on
all ranks before loading and falls back to the next older checkpoint when one
is bad. `pick` verifies a checkpoint of a finished run in one process (`mplaunch export`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from launcher.errors import UserError
from launcher.plan import resume
from launcher.plan.resolve import Plan
from launcher.recipe.schema import to_dict
from launcher.rundir import checkpoint, ownership, space
from launcher.rundir.layout import RunDir
from launcher.worker import audit
from launcher.worker.backends import Backend, NonFiniteStep, ReshardError
from launcher.worker.metrics import Meter

RNG_FILE = "rng-rank{rank}.pt"
# A rank's reason for rejecting a checkpoint, left in the rejected directory for rank 0 (and the user).
REJECTED_FILE = "rejected-by-rank-{rank}.txt"


class Group(Protocol):
    """What the checkpointer needs of the job: this rank, the world size, a barrier, and
    agreement on a flag (launcher.worker.ranks.Dist)."""

    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    def barrier(self) -> None: ...
    def any(self, flag: bool) -> bool: ...


class NonFiniteParameters(NonFiniteStep, ValueError):
    """The parameters about to be saved hold NaN, inf or values too large to square in fp32.

    A NonFiniteStep and a ValueError: train.main reports either as one line.
    """


class Checkpointer:
    """One run's checkpoints, seen from one rank.

    Args:
        plan: the run's plan (checkpoint.every_steps, keep, resume; the structure a resume must match).
        run_dir: where the checkpoints go (checkpoint.dir).
        group: this rank, the world size, and the collectives every rank passes around a save.
    """

    def __init__(self, plan: Plan, run_dir: RunDir, group: Group) -> None:
        self.plan, self.run_dir, self.group = plan, run_dir, group
        self.root = run_dir.checkpoints
        self.last_step: int | None = None  # the newest checkpoint this run restored or sealed
        self.rejected: list[dict[str, Any]] = []  # checkpoints restore found bad, for `report`
        self.resized: dict[str, Any] | None = None  # the world-size change restore made, for `report`

    def due(self, step: int, stopping: bool) -> bool:
        """Save after `step`: on a stop request, at train.max_steps, and every checkpoint.every_steps."""
        every = self.plan.recipe.checkpoint.every_steps
        return stopping or step == self.plan.recipe.train.max_steps or (bool(every) and step % every == 0)

    def save(self, step: int, backend: Backend, meter: Meter, position: tuple[int, int]) -> None:
        """Write checkpoint `step` from every rank, checksum it on every rank, then seal it
        atomically from rank 0.

        Args:
            position: (epoch, step within the epoch) of the data order after `step`.

        Raises:
            NonFiniteLoss, NonFiniteGrads (launcher.worker.backends.NonFiniteStep), NonFiniteParameters:
                the loss or gradient norm of a step so far, or a rank's parameters, were not finite.
            OSError: a full disk (ENOSPC, naming the checkpoint root); what the save wrote is removed.
        """
        meter.check_finite()  # never seal a checkpoint of a diverged run
        self._check_parameters(step, backend)
        audit.record_counters(backend, step, meter)  # the optimizer audit: its step counters
        tmp = checkpoint.tmp_dir(self.root, step)
        try:
            self._write(step, tmp, backend, meter, position)
        except BaseException as exc:
            full = space.full_error(exc, self.root)  # measured before the cleanup frees space
            # A failed save leaves nothing behind; any rank may go first (a rank that then misses the
            # directory reports a consequence: launcher.rundir.layout.SECONDARY).
            space.remove_partial(tmp, exc)
            if full is not None:
                raise full from exc
            raise
        self.last_step = step

    def _write(self, step: int, tmp: Path, backend: Backend, meter: Meter, position: tuple[int, int]) -> None:
        rank, world = self.group.rank, self.group.world
        if rank == 0:
            checkpoint.begin(self.root, step)
        self.group.barrier()
        backend.save(tmp)
        torch.save(_rng_state(), tmp / RNG_FILE.format(rank=rank))
        self.group.barrier()
        # Every rank lists the same finished directory and hashes its share of it in parallel.
        files = checkpoint.list_files(tmp)
        checkpoint.write_checksums(tmp, rank, checkpoint.share(files, rank, world))
        self.group.barrier()
        if rank == 0:
            manifest = self._manifest(step, backend, position)
            manifest["files"] = checkpoint.merge_checksums(tmp, files)
            keep, files_of = self.plan.recipe.checkpoint.keep, self.run_dir  # never prune another run's
            final = checkpoint.commit(tmp, manifest, keep, lambda m: files_of.foreign(m) is None)
            meter.event(step, "checkpoint", f"step {step}: checkpoint saved to {final}", path=str(final))
        self.group.barrier()

    def _check_parameters(self, step: int, backend: Backend) -> None:
        # Agreed across ranks, so every rank raises alike and none waits in a barrier for the others.
        if self.group.any(not math.isfinite(parameter_square_sum(backend))):
            kept = (
                f"the last complete checkpoint, step {self.last_step}, is kept"
                if self.last_step is not None
                else "no earlier checkpoint exists"
            )
            raise NonFiniteParameters(
                f"the parameters after step {step} are not finite (NaN, inf, or values beyond about 1e19): "
                f"nothing was saved and {kept}; lower optimizer.lr, raise scheduler.warmup_steps or check the model"
            )

    def _manifest(self, step: int, backend: Backend, position: tuple[int, int]) -> dict[str, Any]:
        recipe = to_dict(self.plan.recipe)
        epoch, in_epoch = position
        return {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            **checkpoint.structure(self.plan),
            "precision": self.plan.precision.dtype,
            "skipped_steps": backend.skipped_steps(),
            "loss_scale": backend.loss_scale(),
            "recipe_hash": checkpoint.recipe_hash(recipe),
            "recipe": recipe,
            ownership.RUN_KEY: ownership.identity(self.run_dir.path),  # whose it is (a shared checkpoint.dir)
            # What a resume must not change (launcher.plan.resume); the launcher compares it up front.
            resume.SIGNATURE_KEY: resume.signature(self.plan),
        }

    def restore(self, backend: Backend) -> int:
        """Load the newest checkpoint that verifies (checkpoint.resume=auto); return the step to start at.

        Candidates are tried newest first. Every rank checks the listed files' sizes and the
        checksums of its share, the ranks agree, then every rank loads; a candidate failing either
        (on any rank) is reported in one line on rank 0, renamed `corrupt-step-N` and the next older
        one is tried. Torn directories are skipped silently: the launcher warned about them.

        Raises:
            ValueError: a checkpoint of another backend or ZeRO stage, or of another run (a shared
                checkpoint.dir); or there are checkpoints (corrupt ones too) but none verifies.
        """
        if self.plan.recipe.checkpoint.resume == "never":
            return 0
        candidates = checkpoint.newest_first(self.root)
        for path, manifest in candidates:
            problems = checkpoint.mismatch(manifest, checkpoint.structure(self.plan), resizable=True)
            other = self.run_dir.foreign(manifest)  # refused by the launcher; a Slurm restart has none
            problems += [f"the run {other} wrote it (the same name and checkpoint.dir)"] if other else []
            if problems:
                raise ValueError(f"cannot resume from {path}: {'; '.join(problems)}")
            # Agree on the checksums before anyone loads: a rank that skipped the load while
            # the others run the backend's collectives would leave them waiting.
            problem = self._verify(path, manifest)
            if not self.group.any(problem is not None):
                try:
                    problem = self._load(path, manifest, backend)
                except ReshardError as exc:
                    raise ValueError(
                        f"cannot resume from {path} on {_ranks(self.group.world)}: {exc}"
                    ) from None
                if not self.group.any(problem is not None):
                    self.last_step = int(manifest["step"])
                    return self.last_step
            self._reject(path, manifest, problem)
        if candidates or checkpoint.corrupt(self.root):  # never a fresh start beside corrupt checkpoints
            raise ValueError(
                f"no checkpoint in {self.root} passed verification (each was renamed "
                f"{checkpoint.CORRUPT_PREFIX}{checkpoint.PREFIX}N and kept): nothing was trained, and running "
                f"the same recipe again is refused {ownership.UNTIL_MOVED}"
            )
        return 0

    def _verify(self, path: Path, manifest: dict[str, Any]) -> str | None:
        """This rank's reason to reject `path` (sizes, then its share of the checksums), or None."""
        rank, world = self.group.rank, self.group.world
        if not checkpoint.verified(manifest):
            if rank == 0:
                _say(
                    f"checkpoint {path.name} is format {manifest.get('format', 1)} with no checksums: "
                    "resuming from it unverified"
                )
            return None
        problem = checkpoint.check_sizes(path, manifest)
        if problem is None:
            names = checkpoint.share(checkpoint.listed(manifest), rank, world)
            problem = checkpoint.check_checksums(path, manifest, names)
        return problem

    def _load(self, path: Path, manifest: dict[str, Any], backend: Backend) -> str | None:
        """Load `path` on this rank; the error in one line if it fails.

        Reached only once every rank's checksums passed, so a failure here is rare (a file
        that verifies yet does not load); a rank failing inside one of the backend's
        collectives can still leave the others waiting until the process group times out.
        A checkpoint of another world size is resharded by the backend (rank 0 says how);
        a rank the old run did not have starts its random streams from the seed, its rank
        and the step (no saved stream is its own).
        """
        rank, saved_world = self.group.rank, int(manifest.get("world_size", self.group.world))
        started = time.perf_counter()
        try:
            note = backend.load(path, saved_world)
            rng = path / RNG_FILE.format(rank=rank)
            if rank < saved_world and rng.is_file():
                _set_rng_state(torch.load(rng, weights_only=False))
            else:
                seed_all(self.plan.recipe.train.seed + 1009 * int(manifest["step"]) + rank)
        except ReshardError:
            raise  # the checkpoint is sound: restore stops without calling it corrupt
        except Exception as exc:
            return f"cannot be loaded ({type(exc).__name__}: {first_line(exc)})"
        if saved_world != self.group.world and rank == 0:
            self.resized = {
                "step": int(manifest["step"]),
                "from_world": saved_world,
                "to_world": self.group.world,
                "seconds": round(time.perf_counter() - started, 3),
                "how": note or "loaded as saved (nothing is sharded by rank)",
            }
            _say(
                f"resumed step {manifest['step']} written by {_ranks(saved_world)} on {_ranks(self.group.world)}: "
                f"{self.resized['how']} ({self.resized['seconds']:.1f} s)",
                kind="",
            )
        return None

    def _reject(self, path: Path, manifest: dict[str, Any], problem: str | None) -> None:
        """Agreed bad: rank 0 reports the first rank's reason and renames the directory."""
        rank = self.group.rank
        if problem is not None:
            (path / REJECTED_FILE.format(rank=rank)).write_text(problem + "\n")
        self.group.barrier()
        if rank == 0:
            reasons = [
                (r, (path / REJECTED_FILE.format(rank=r)).read_text().strip())
                for r in range(self.group.world)
                if (path / REJECTED_FILE.format(rank=r)).is_file()
            ]
            who, why = reasons[0] if reasons else (0, "rejected by another rank")
            moved = checkpoint.mark_corrupt(path)
            message = (
                f"checkpoint {path.name} failed verification on rank {who}: {why}; "
                f"renamed to {moved.name}, trying an older checkpoint"
            )
            _say(message)
            self.rejected.append(
                {"step": int(manifest["step"]), "path": str(moved), "reason": why, "message": message}
            )
        self.group.barrier()

    def report(self, meter: Meter) -> None:
        """Record the checkpoints `restore` rejected as metrics events (rank 0; already printed)."""
        if self.group.rank != 0:
            return
        for bad in self.rejected:
            meter.write({"kind": "event", "event": "checkpoint_rejected", "time": time.time(), **bad})
        self.rejected = []
        if self.resized is not None:
            meter.write({"kind": "event", "event": "resized", "time": time.time(), **self.resized})
            self.resized = None

    def finish(self, step: int) -> None:
        """Mark the run finished at train.max_steps (rank 0): a requeue or relaunch then does nothing."""
        if self.group.rank == 0:
            self.run_dir.write_finished(step)


def pick(run: RunDir, step: int | None) -> tuple[Path, int]:
    """The complete checkpoint of `step` (None: the newest), verified: sizes and CRC-32s.

    Raises:
        UserError: no complete checkpoint, no such step (the available ones are listed), or a
            checkpoint that is unverifiable (format 1) or fails verification (the file is named).
    """
    found = run.complete_checkpoints()
    steps = sorted(int(m["step"]) for _, m in found)
    if not found:
        raise UserError(f"{run.path}: no complete checkpoint in {run.checkpoints}; nothing to export")
    chosen = [(p, m) for p, m in found if int(m["step"]) == step] if step is not None else found[:1]
    if not chosen:
        raise UserError(
            f"--step {step}: no complete checkpoint of step {step} in {run.checkpoints}; "
            f"available: {', '.join(map(str, steps))}"
        )
    path, manifest = chosen[0]
    chosen_step = int(manifest["step"])
    older = [s for s in steps if s < chosen_step]
    hint = f"--step {older[-1]} exports an older one" if older else None
    if not checkpoint.verified(manifest):
        raise UserError(
            f"{path}: format {manifest.get('format', 1)} checkpoint without checksums; cannot verify it",
            hint=hint,
        )
    problem = checkpoint.check_sizes(path, manifest) or checkpoint.check_checksums(
        path, manifest, [name for name, _ in checkpoint.listed(manifest)]
    )
    if problem is not None:
        raise UserError(f"checkpoint {path} failed verification: {problem}", hint=hint)
    return path, chosen_step


def parameter_square_sum(backend: Backend) -> float:
    """The sum of squares, in fp32, of the parameters this rank holds (its ZeRO-3 partition,
    `ds_tensor`, where there is one). NaN or inf if any is, and inf once a weight passes
    about 1e19 (its square overflows fp32): the cheap test that a step is fit to save."""
    held = [_held(p) for p in backend.model.parameters()]
    tensors = [t.detach() for t in held if t.numel()]
    if not tensors:
        return 0.0
    # Norms taken in fp32 whatever the parameters' dtype: an fp16 norm overflows at 65504.
    norms = torch.stack(list(torch._foreach_norm(tensors, 2, dtype=torch.float32)))
    return float((norms * norms).sum())


def _held(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of `param`: all of it, or the real elements of its ZeRO-3 partition.

    A ZeRO-3 partition is padded to equal size on every rank, and the padding is uninitialised
    memory no computation reads: it may hold any bits, NaN included, so it is left out.
    """
    if isinstance(param.data, DTensor):  # FSDP2: this rank's shard
        local: torch.Tensor = param.data.to_local()
        return local
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    size = int(getattr(part, "ds_numel", part.numel()))
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    real = max(0, min(size, int(getattr(param, "ds_numel", size)) - rank * size))
    return part.reshape(-1).narrow(0, 0, real)


def _say(message: str, kind: str = "warning: ") -> None:
    print(f"mplaunch: {kind}{message}", file=sys.stderr, flush=True)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random streams (the streams a checkpoint saves per rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def first_line(exc: BaseException) -> str:
    """An error's first line, at most 300 characters, for a one-line report."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
