"""The two training backends behind one small interface, imported lazily by name.

Both keep master weights and optimizer state in fp32 and compute in the
plan's dtype; both report the loss scale and skipped steps the same way.
Each owns its checkpoint format: `Engine.save` and `Engine.load` write and read
it in a run, `consolidate_fp32` reads it back without an engine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from launcher.plan.resolve import Plan
from launcher.worker.models import label_tokens

BACKENDS = {
    "deepspeed": "launcher.worker.backends.deepspeed",
    "accelerate": "launcher.worker.backends.accelerate",
}


class LossScaleFloor(Exception):
    """fp16 gradients still overflow at the minimum loss scale: training cannot continue."""


class NonFiniteStep(Exception):
    """A step's loss or gradients were NaN or infinite and the run stopped; str() is the whole message."""


class ReshardError(RuntimeError):
    """A sound checkpoint that cannot be brought to this world size (its converter failed, or the
    converted copy cannot be written); the message, one line, names the world size that loads it
    as it is. Raised alike on every rank, and never a reason to call the checkpoint corrupt."""


class SkippedStep(NonFiniteStep):
    """DeepSpeed skipped a step for non-finite gradients outside fp16 loss scaling (nothing adapts to it)."""


def non_finite_message(step: int, dtype: str, loss_finite: bool, skipped_by: str | None = None) -> str:
    """What happened at `step`, what it means for the checkpoints, and what to try.

    The checkpointer checks every step since the last check before it saves, so a save never
    seals a step at or after `step`.

    Args:
        step: the first bad step (1-based, as the logs count).
        dtype: the compute dtype (precision.dtype as resolved).
        loss_finite: the loss was finite on every rank, so only the gradients were not.
        skipped_by: the library that skipped the step's update, if one did.
    """
    if loss_finite:
        what = f"the gradients became NaN or infinite in {dtype} at step {step} while the loss was finite"
        advice = "check the model's backward pass, or lower optimizer.lr"
    else:
        what = f"the loss became NaN or infinite in {dtype} at step {step}"
        advice = "lower optimizer.lr, raise scheduler.warmup_steps or check the data"
    if skipped_by is not None:
        what += f"; {skipped_by} skipped that step, and {dtype} has no loss scale to lower"
    return (
        f"{what}: the run stopped and nothing from step {step} on was saved "
        f"(the last complete checkpoint, if any, is kept); {advice} "
        "(`mplaunch --resume RUN_DIR optimizer.lr=...` resumes from the last checkpoint with the new value)"
    )


@dataclass
class StepStats:
    """What one optimizer step returns; tensors stay on the device (no host sync)."""

    # mean over the step's micro-batches of their (TokenWeights-weighted) losses; the mean over ranks is the step's loss
    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None
    skipped: bool | None  # known only where the backend checks overflow anyway (fp16)
    xray: dict[str, Any] | None = None  # the precision x-ray record, on steps that took one


class Backend(Protocol):
    model: nn.Module
    measure_grads: bool  # read the gradients' bytes during this step (logging.memory_report)
    xray: (
        str | None
    )  # this step's precision x-ray: None, "stats", or "sketch" (stats and sketch; launcher.worker.xray)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats: ...
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def loss_scale(self) -> float | None: ...
    def skipped_steps(self) -> int: ...
    # The optimizer audit's view (launcher.worker.audit): the torch optimizer over the fp32 master
    # weights (None: none to audit), and this rank's masters, each with its param group.
    def torch_optimizer(self) -> torch.optim.Optimizer | None: ...
    def fp32_masters(self) -> list[tuple[torch.Tensor, dict[str, Any]]]: ...
    def lr(self) -> float: ...
    def save(self, directory: Path) -> None: ...
    # Load the checkpoint `save` wrote into `directory` with `saved_world` ranks (this run may have
    # another world size: the backend reshards); a one-line note of any conversion it made, else None.
    def load(self, directory: Path, saved_world: int) -> str | None: ...
    def state_bytes(self) -> dict[str, int]: ...


def load_backend(plan: Plan, model: nn.Module) -> Backend:
    """Wrap `model` with the plan's backend."""
    module = importlib.import_module(BACKENDS[plan.recipe.backend])
    return module.Engine(plan, model)


def consolidate_fp32(plan: Plan, directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) of the checkpoint the plan's backend saved into
    `directory`, under the trained module's names; no engine, process group or GPU needed.

    Raises:
        launcher.errors.UserError: the backend's files are missing or do not fit together.
        launcher.worker.models.ModelError: the plan's model, which DeepSpeed stage 0 in 16 bits
            needs to order its masters, cannot be built.
        OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError: a file
            does not load.
    """
    module = importlib.import_module(BACKENDS[plan.recipe.backend])
    state: dict[str, torch.Tensor] = module.consolidate_fp32(directory, plan)
    return state


class TokenWeights:
    """Each micro-batch's loss factor under train.loss_normalization tokens; identity otherwise.

    Both backends average the gradients over ranks and over the step's micro-batches (DDP and FSDP
    divide by the world size, the Accelerate engine and DeepSpeed's `backward` by grad_accum), so a
    micro-batch whose mean loss over its n label tokens is multiplied by
    n * world_size * grad_accum / N, N being the step's label tokens on every rank, leaves exactly
    the gradient of (sum of every token loss of the step) / N, Hugging Face Trainer's loss. The
    per-rank mean of the weighted losses, averaged over ranks as the Meter does, is that loss.

    The micro-batches are counted on the host from their labels (CPU tensors: no device sync) when
    the step begins, and N is summed by one all_reduce started then and waited for only before the
    first micro-batch's loss is weighted, after its forward: it adds no host-device sync.
    """

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.on = plan.model.language_model and plan.recipe.train.loss_normalization == "tokens"
        self.causal = plan.model.causal
        self.device = device
        self.accum = plan.batch.grad_accum  # what both backends divide the gradients by
        self.counts: list[int] = []
        self.factor = self.accum
        self.total = torch.zeros((), dtype=torch.int64)
        self.pending: Any = None

    def start(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Count this step's label tokens on this rank and start summing them over the ranks."""
        if not self.on:
            return
        self.counts = [label_tokens(b["labels"], self.causal) for b in micro_batches]
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.factor = self.accum * world
        self.total = torch.tensor(sum(self.counts), dtype=torch.int64).to(self.device, non_blocking=True)
        if torch.distributed.is_initialized():
            self.pending = torch.distributed.all_reduce(self.total, async_op=True)

    def __call__(self, i: int, loss: torch.Tensor) -> torch.Tensor:
        """Micro-batch `i`'s mean loss, weighted for the step's token mean (unchanged under batch)."""
        if not self.on:
            return loss
        if self.pending is not None:
            self.pending.wait()  # NCCL: the stream waits, not the host
            self.pending = None
        if self.counts[i] == 0:  # its mean is 0/0 (NaN), but no label sends a gradient back
            return loss.float().nan_to_num(0.0) * 0.0
        # In fp32 whatever the loss's dtype: a bf16 factor would round the step's weights by 1/256.
        return loss.float() * (self.counts[i] * self.factor / self.total.double()).float()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases and norm weights (the BERT recipe)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Pinned host memory makes these copies asynchronous on CUDA.
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def tensor_bytes(*roots: object, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` (lists, tuples, dicts, tensors).

    Storages already in `seen` are not counted again (pass one set across categories so an
    alias, such as ZeRO-3's fp32 partition that is the parameter partition, counts once).
    """
    seen = set() if seen is None else seen
    total = 0
    stack = list(roots)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, seen: set[int] | None = None) -> int:
    """Bytes of a torch optimizer's per-parameter state (Adam's moments), not its parameters."""
    return tensor_bytes([s for s in optimizer.state.values()], seen=seen)
