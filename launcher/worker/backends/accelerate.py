"""HF Accelerate behind the Backend interface: DDP at zero.stage 0, FSDP2 at stages 1-3.

The engine consumes exactly the plan's accelerate settings (what the dry run
prints; backend_config.accelerate_settings). At zero.stage 0 the Accelerator
prepares the model (DDP); at stages 1-3 mplaunch shards it with torch's
`fully_shard` on every device, CPU included, and the Accelerator only sets up
the process and device (launcher.worker.backends.fsdp2 says why and how).
Gradient accumulation is done here, autocast and fp16 loss scaling by
launcher.worker.precision from the plan's policy (the settings' `autocast` and
`loss_scale` print the same values): the
Accelerator runs with mixed_precision "no", because Accelerate has no autocast
and no GradScaler for fp16 on CPU and its scaler lacks DeepSpeed's hysteresis
and floor: `precision.loss_scale` must mean the same on both backends.

Checkpoints: DDP through Accelerate's save_state (the whole model and optimizer
on every rank), FSDP2 through torch.distributed.checkpoint (each rank its
shards); both load at another world size. `consolidate_fp32` reads either back
without an engine (`mplaunch export`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan import hf_dir, schedule
from launcher.plan.loss_scale import ScaleAtMinimum
from launcher.plan.resolve import Plan
from launcher.worker import fp8, xray
from launcher.worker.backends import (
    LossScaleFloor,
    StepStats,
    TokenWeights,
    fsdp2,
    optimizer_state_bytes,
    param_groups,
    tensor_bytes,
    to_device,
)
from launcher.worker.models import loss_of
from launcher.worker.precision import Precision

EXTRA_STATE = "mplaunch_accelerate.json"
# What save_state writes for the (DDP) model.
MODEL_FILES = (hf_dir.SAFETENSORS_FILE, hf_dir.TORCH_FILE)


class Engine:
    """The model, DDP-prepared by Accelerate (zero.stage 0) or sharded by FSDP2 (1-3), and its
    AdamW, one optimizer step per `train_step`."""

    def __init__(self, plan: Plan, model: nn.Module) -> None:
        from accelerate import Accelerator

        self.plan = plan
        settings = plan.backend_config
        self.accum = settings["grad_accum"]
        self.clip = settings["grad_clip"]
        self.fsdp: dict[str, Any] | None = settings["fsdp2"]
        self.acc = Accelerator(**settings["accelerator"])
        self.device = self.acc.device
        if plan.recipe.train.compile:
            model.compile()  # in place: parameter names, and so checkpoints, stay the same
        self.sharded: str | None = None  # what fully_shard was applied to (FSDP2)
        if self.fsdp is not None:  # sharded before the optimizer sees the (DTensor) parameters
            self.sharded = fsdp2.apply(model, self.fsdp, plan.recipe.model, self.device)
            if self.acc.is_main_process:
                print(f"mplaunch: {self.sharded}", flush=True)
        optimizer = _adamw(model, settings["optimizer"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor(plan.recipe))
        self.weights = TokenWeights(plan, self.device)
        if self.fsdp is None:
            self.model, self.optimizer = self.acc.prepare(model, optimizer)
            self.inner: torch.optim.Optimizer = self.optimizer.optimizer
        else:
            self.model, self.optimizer, self.inner = model, optimizer, optimizer
        self.precision = Precision(plan.precision, self.device.type, sharded=self.fsdp is not None)
        self.skipped = 0
        self.grad_bytes: int | None = None
        self.measure_grads = False
        self.xray: str | None = None
        self.layers = xray.layers_of(list(self.model.named_parameters()))
        f8 = plan.precision.fp8
        self.fp8_all_gather = bool(f8 and f8["all_gather"] and self.fsdp is not None)

    def _shards(self) -> list[xray.Shard]:
        """This rank's parts of the gradients and fp32 weights (the parameters are the master weights).

        FSDP2's parameters and gradients are DTensors holding this rank's shard; DDP's hold the
        whole tensor, of which each rank takes its slice.
        """
        if self.fsdp is not None:
            return fsdp2.shards(self.model)
        rank, world = self.acc.process_index, self.acc.num_processes
        out = []
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g, w = xray.my_slice(p.grad, rank, world), xray.my_slice(p.data, rank, world)
                start = xray.slice_start(p.numel(), rank, world)
                out.append(xray.Shard(xray.layer_of(name), g, w, start))
        return out

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (the settings' `autocast`); None: no autocast."""
        return self.precision.autocast_dtype

    @property
    def scaler(self) -> Any:
        """The fp16 loss scaler (the settings' `loss_scale`); None without one."""
        return self.precision.scaler

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats:
        total = torch.zeros((), device=self.device)
        inner = self.inner
        self.weights.start(micro_batches)
        for i, batch in enumerate(micro_batches):
            # Gradients are reduced only on the last micro-batch of the step.
            with self._sync(i == len(micro_batches) - 1):
                with self.precision.autocast():
                    loss = self.weights(i, loss_of(self.model(**to_device(batch, self.device))))
                self.precision.scale(loss.float() / self.accum).backward()
            total += loss.detach().float()
        if self.measure_grads:
            self.grad_bytes = self._grad_bytes()
        self.precision.unscale_(inner)
        probe = None
        if self.xray:  # the unscaled, unclipped gradients; the scale their backward used
            dtype, scale = self.plan.precision.compute_dtype, self.loss_scale()
            probe = xray.Probe(self.layers, self._shards(), dtype, scale, False, self.xray == "sketch")
            lr = self.lr()
        grad_norm = self._clip()
        # Without a scaler nothing skips a step with non-finite gradients (deciding on the host
        # would sync every step): the returned grad_norm marks it in the Meter, on the device, and
        # the check at the next log interval or save stops the run before any of it is saved.
        try:
            skipped = self.precision.step(inner)
        except ScaleAtMinimum as exc:
            raise LossScaleFloor(str(exc)) from None
        self.skipped += int(bool(skipped))
        if self.fp8_all_gather and not skipped:  # the weights changed: their fp8 scales for the next gather
            fp8.after_optimizer_step(self.model)
        # A skipped step must not advance the LR schedule (DeepSpeed's rule too).
        if not skipped:
            self.scheduler.step()
        inner.zero_grad(set_to_none=True)
        seen = probe.finish(not skipped, lr, self.acc.num_processes) if probe is not None else None
        return StepStats(total / len(micro_batches), grad_norm, skipped, seen)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """The context of one micro-batch: gradient reduction on the step's last one only."""
        if self.fsdp is not None:
            self.model.set_requires_gradient_sync(last)  # the FSDPModule's
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def _clip(self) -> torch.Tensor:
        """Clip the gradients to train.grad_clip (0: no clipping); their global norm."""
        limit = self.clip if self.clip > 0 else float("inf")
        if self.fsdp is not None:
            return fsdp2.clip_grad_norm_(list(self.model.parameters()), limit)
        norm: torch.Tensor = self.acc.clip_grad_norm_(self.model.parameters(), limit)
        return norm

    def _grad_bytes(self) -> int:
        if self.fsdp is not None:
            return fsdp2.grad_bytes(self.model)
        return tensor_bytes([p.grad for p in self.model.parameters()])

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        try:
            with self.precision.autocast():
                return loss_of(self.model(**to_device(batch, self.device))).detach().float()
        finally:
            self.model.train()

    def loss_scale(self) -> float | None:
        return self.precision.loss_scale()

    def skipped_steps(self) -> int:
        return self.skipped

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer over the fp32 master weights, which are the parameters (the audit reads its state)."""
        return self.inner

    def fp32_masters(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """This rank's fp32 master weights (the parameters: FSDP2's are DTensors of this rank's shard),
        each with its param group."""
        return [(p, g) for g in self.torch_optimizer().param_groups for p in g["params"]]

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds (FSDP2: its shards). Under autocast the parameters are the fp32
        master weights themselves, so `master` is 0: there is no separate copy."""
        if self.fsdp is not None:
            return fsdp2.state_bytes(self.model, self.inner, self.grad_bytes)
        return {
            "params": tensor_bytes(list(self.model.parameters())),
            "grads": self.grad_bytes if self.grad_bytes is not None else -1,
            "master": 0,
            "optimizer": optimizer_state_bytes(self.inner),
        }

    def save(self, directory: Path) -> None:
        """Model and optimizer (DDP: Accelerate's save_state; FSDP2: every rank's shards through DCP);
        schedule and scaler beside them."""
        if self.fsdp is not None:
            fsdp2.save(self.model, self.inner, directory)
        else:
            self.acc.save_state(str(directory), safe_serialization=False)
        if self.acc.is_main_process:
            extra = {
                "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped,
                "scale": self.precision.state_dict(),
            }
            (directory / EXTRA_STATE).write_text(json.dumps(extra))

    def load(self, directory: Path, saved_world: int) -> str | None:
        """Load what `save` wrote with `saved_world` ranks; a line saying how a world-size change was met.

        DDP's model and optimizer files are whole, so any world size loads them; Accelerate's
        random_states_{rank}.pkl, which it skips when this rank's is missing, is overridden by the
        checkpointer's own RNG files. FSDP2's shards are resharded by DCP.
        """
        note = None
        if self.fsdp is not None:
            note = fsdp2.load(self.model, self.inner, directory, saved_world)
        else:
            self.acc.load_state(str(directory))
            if saved_world != self.acc.num_processes:
                note = f"DDP state is whole on every rank: loaded as saved by {saved_world} ranks"
        extra = json.loads((directory / EXTRA_STATE).read_text())
        self.scheduler.load_state_dict(extra["scheduler"])
        schedule.continue_on(self.scheduler, self.plan.recipe)
        self.skipped = extra["skipped_steps"]
        self.precision.load_state_dict(extra["scale"])
        return note


def _adamw(model: nn.Module, opt: dict[str, Any]) -> torch.optim.Optimizer:
    """torch's AdamW as the settings' `optimizer` says, over the trainable parameters."""
    assert opt["type"] == "AdamW"
    return torch.optim.AdamW(
        param_groups(model, opt["weight_decay"]),
        lr=opt["lr"],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
        fused=opt["fused"],
    )


def consolidate_fp32(directory: Path, plan: Plan) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) in checkpoint `directory`, as `Engine.save` wrote them.

    Under autocast the parameters are the fp32 master weights, so the model is the answer: the
    pytorch_model.bin save_state wrote (DDP), or the model's part of the DCP checkpoint (FSDP2),
    merged from every rank's shards.

    Raises:
        UserError: no model file from save_state (zero.stage 0) or no DCP checkpoint (1-3) in `directory`.
    """
    if plan.backend_config.get("fsdp2") is not None:
        return fsdp2.consolidate_fp32(directory)
    for name in MODEL_FILES:
        if (directory / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(directory / name)
            loaded: dict[str, torch.Tensor] = torch.load(
                directory / name, map_location="cpu", weights_only=True
            )
            return loaded
    raise UserError(f"{directory}: no model file from Accelerate's save_state ({', '.join(MODEL_FILES)})")
