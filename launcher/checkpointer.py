"""The worker's checkpointer: when to save, what to save, sealing, pruning and restoring.

The loop asks `due(step, stopping)`, calls `save(...)` and, once, `restore(...)`;
everything else about checkpoints happens here. Each rank writes its backend
shards and its RNG state into the temporary directory launcher.checkpoint
hands out; rank 0 then writes the manifest (step, data position, structure,
the resolved recipe) and seals it. A checkpoint of a diverged run is never sealed.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch

from launcher import checkpoint
from launcher.backends import Backend
from launcher.metrics import Meter
from launcher.plan import Plan
from launcher.recipe import to_dict
from launcher.rundir import RunDir

RNG_FILE = "rng-rank{rank}.pt"


class Group(Protocol):
    """What the checkpointer needs of the job: this rank and a barrier (train.Dist)."""

    @property
    def rank(self) -> int: ...

    def barrier(self) -> None: ...


class Checkpointer:
    """One run's checkpoints, seen from one rank.

    Args:
        plan: the run's plan (checkpoint.every_steps, keep, resume; the structure a resume must match).
        run_dir: where the checkpoints go (checkpoint.dir).
        group: this rank and the barrier every rank passes around a save.
    """

    def __init__(self, plan: Plan, run_dir: RunDir, group: Group) -> None:
        self.plan, self.run_dir, self.group = plan, run_dir, group
        self.root = run_dir.checkpoints

    def due(self, step: int, stopping: bool) -> bool:
        """Save after `step`: on a stop request, at train.max_steps, and every checkpoint.every_steps."""
        every = self.plan.recipe.checkpoint.every_steps
        return stopping or step == self.plan.recipe.train.max_steps or (bool(every) and step % every == 0)

    def save(self, step: int, backend: Backend, meter: Meter, position: tuple[int, int]) -> None:
        """Write checkpoint `step` from every rank, then seal it atomically from rank 0.

        Args:
            position: (epoch, step within the epoch) of the data order after `step`.

        Raises:
            NonFiniteLoss: the loss since the last record is not finite; nothing is written.
        """
        meter.check_finite()  # never seal a checkpoint of a diverged run
        rank = self.group.rank
        if rank == 0:
            checkpoint.begin(self.root, step)
        self.group.barrier()
        tmp = checkpoint.tmp_dir(self.root, step)
        backend.save(tmp)
        torch.save(_rng_state(), tmp / RNG_FILE.format(rank=rank))
        self.group.barrier()
        if rank == 0:
            final = checkpoint.commit(
                tmp, self._manifest(step, backend, position), self.plan.recipe.checkpoint.keep
            )
            meter.event(step, "checkpoint", f"step {step}: checkpoint saved to {final}", path=str(final))
        self.group.barrier()

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
        }

    def restore(self, backend: Backend) -> int:
        """Load the latest complete checkpoint (checkpoint.resume=auto); return the step to start at.

        Torn directories are skipped silently here: the launcher warned about them before
        the workers started.

        Raises:
            ValueError: the checkpoint was written with another world size, backend or ZeRO stage.
        """
        if self.plan.recipe.checkpoint.resume == "never":
            return 0
        found = self.run_dir.resume_point()
        if found.path is None or found.manifest is None:
            return 0
        problems = checkpoint.mismatch(found.manifest, checkpoint.structure(self.plan))
        if problems:
            raise ValueError(f"cannot resume from {found.path}: {'; '.join(problems)}")
        backend.load(found.path)
        _set_rng_state(torch.load(found.path / RNG_FILE.format(rank=self.group.rank), weights_only=False))
        return int(found.manifest["step"])

    def finish(self, step: int) -> None:
        """Mark the run finished at train.max_steps (rank 0): a requeue or relaunch then does nothing."""
        if self.group.rank == 0:
            self.run_dir.write_finished(step)


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
