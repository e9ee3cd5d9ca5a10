"""HF Accelerate behind the Backend interface: DDP, or FSDP for ZeRO stages on GPU.

The engine consumes exactly the plan's accelerate settings (what the dry run
prints; backend_config.accelerate_settings). Gradient accumulation, autocast
and fp16 loss scaling are done here explicitly, and only here: the
Accelerator runs with mixed_precision "no", because Accelerate has no autocast
and no GradScaler for fp16 on CPU and its scaler lacks DeepSpeed's hysteresis
and floor: `precision.loss_scale` must mean the same on both backends.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from launcher.plan import schedule
from launcher.plan.loss_scale import DynamicScale, ScaleAtMinimum
from launcher.plan.resolve import Plan
from launcher.recipe.schema import LossScale
from launcher.worker import xray
from launcher.worker.backends import (
    LossScaleFloor,
    StepStats,
    optimizer_state_bytes,
    param_groups,
    tensor_bytes,
    to_device,
)
from launcher.worker.models import loss_of

EXTRA_STATE = "mplaunch_accelerate.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _scaler_class(sharded: bool) -> type:
    from torch.amp import GradScaler

    base: type[GradScaler] = GradScaler
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        base = ShardedGradScaler

    class HysteresisScaler(base):  # type: ignore[valid-type,misc]  # a base chosen at run time
        """torch's GradScaler (which unscales, checks for inf and skips the step) whose
        scale follows DeepSpeed's rules (hysteresis, window, floor) instead of its own.

        Reading the overflow flag is one host sync per step, only in fp16; DeepSpeed's
        fp16 optimizers make the same check.
        """

        def __init__(self, device: str, rule: DynamicScale) -> None:
            super().__init__(device, init_scale=rule.scale, growth_interval=2**31 - 1)
            self.rule = rule
            self.last_overflow = False

        def update(self, new_scale: float | None = None) -> None:
            found = [
                v
                for state in self._per_optimizer_states.values()
                for v in state["found_inf_per_device"].values()
            ]
            self.last_overflow = bool(sum(float(v.item()) for v in found))
            super().update()  # resets the per-step bookkeeping; the scale is set below
            self.rule.update(self.last_overflow)
            self._scale.fill_(self.rule.scale)

    return HysteresisScaler


class Engine:
    """An Accelerate-prepared model and optimizer stepping one optimizer step per `train_step`."""

    def __init__(self, plan: Plan, model: nn.Module) -> None:
        from accelerate import Accelerator

        self.plan = plan
        settings = plan.backend_config
        self.accum = settings["grad_accum"]
        self.clip = settings["grad_clip"]
        self.dtype = DTYPES[settings["autocast"]] if settings["autocast"] else None
        self.acc = Accelerator(**settings["accelerator"], fsdp_plugin=_fsdp_plugin(settings["fsdp_plugin"]))
        self.device = self.acc.device
        opt = settings["optimizer"]
        assert opt["type"] == "AdamW"
        optimizer = torch.optim.AdamW(
            param_groups(model, opt["weight_decay"]),
            lr=opt["lr"],
            betas=tuple(opt["betas"]),
            eps=opt["eps"],
            fused=opt["fused"],
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor(plan.recipe))
        if plan.recipe.train.compile:
            model.compile()  # in place: parameter names, and so checkpoints, stay the same
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scaler = None
        if settings["loss_scale"] is not None:
            rule = DynamicScale.from_recipe(LossScale(**settings["loss_scale"]))
            self.scaler = _scaler_class(settings["fsdp_plugin"] is not None)(self.device.type, rule)
        self.skipped = 0
        self.grad_bytes: int | None = None
        self.measure_grads = False
        self.xray: str | None = None
        self.layers = xray.layers_of(list(self.model.named_parameters()))

    def _shards(self) -> list[xray.Shard]:
        """This rank's parts of the gradients and fp32 weights (the parameters are the master weights).

        FSDP's parameters (use_orig_params) hold this rank's shard; DDP's hold the whole tensor,
        of which each rank takes its slice.
        """
        whole = self.plan.backend_config["fsdp_plugin"] is None
        rank, world = self.acc.process_index, self.acc.num_processes
        out = []
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            if whole:
                g, w = xray.my_slice(p.grad, rank, world), xray.my_slice(p.data, rank, world)
                start: int | None = xray.slice_start(p.numel(), rank, world)
            else:  # where FSDP's shard starts in the parameter is not exposed: no sketch
                g, w, start = p.grad.reshape(-1), p.data.reshape(-1), None
            out.append(xray.Shard(xray.layer_of(name), g, w, start))
        return out

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats:
        total = torch.zeros((), device=self.device)
        inner = self.optimizer.optimizer
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self._autocast():
                    loss = loss_of(self.model(**to_device(batch, self.device)))
                scaled = loss.float() / self.accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total += loss.detach().float()
        if self.measure_grads:
            self.grad_bytes = tensor_bytes([p.grad for p in self.model.parameters()])
        if self.scaler is not None:
            self.scaler.unscale_(inner)
        probe = None
        if self.xray:  # the unscaled, unclipped gradients; the scale their backward used
            dtype, scale = self.plan.precision.dtype, self.loss_scale()
            probe = xray.Probe(self.layers, self._shards(), dtype, scale, False, self.xray == "sketch")
            lr = self.lr()
        grad_norm = self.acc.clip_grad_norm_(
            self.model.parameters(), self.clip if self.clip > 0 else float("inf")
        )
        skipped = None
        if self.scaler is not None:
            self.scaler.step(inner)
            try:
                self.scaler.update()
            except ScaleAtMinimum as exc:
                raise LossScaleFloor(str(exc)) from None
            skipped = self.scaler.last_overflow
            self.skipped += int(skipped)
        else:
            # Nothing skips a step with non-finite gradients here (deciding on the host would
            # sync every step): the returned grad_norm marks it in the Meter, on the device, and
            # the check at the next log interval or save stops the run before any of it is saved.
            inner.step()
        # A skipped step must not advance the LR schedule (DeepSpeed's rule too).
        if not skipped:
            self.scheduler.step()
        inner.zero_grad(set_to_none=True)
        seen = probe.finish(not skipped, lr, self.acc.num_processes) if probe is not None else None
        return StepStats(total / len(micro_batches), grad_norm, skipped, seen)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        try:
            with self._autocast():
                return loss_of(self.model(**to_device(batch, self.device))).detach().float()
        finally:
            self.model.train()

    def loss_scale(self) -> float | None:
        return self.scaler.rule.scale if self.scaler is not None else None

    def skipped_steps(self) -> int:
        return self.skipped

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds. Under autocast the parameters are the fp32 master weights
        themselves, so `master` is 0: there is no separate copy."""
        return {
            "params": tensor_bytes(list(self.model.parameters())),
            "grads": self.grad_bytes if self.grad_bytes is not None else -1,
            "master": 0,
            "optimizer": optimizer_state_bytes(self.optimizer.optimizer),
        }

    def save(self, directory: Path) -> None:
        """Model and optimizer through Accelerate; schedule and scaler beside them."""
        self.acc.save_state(str(directory), safe_serialization=False)
        if self.acc.is_main_process:
            extra = {
                "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped,
                "scale": self.scaler.rule.state_dict() if self.scaler else None,
            }
            (directory / EXTRA_STATE).write_text(json.dumps(extra))

    def load(self, directory: Path) -> None:
        self.acc.load_state(str(directory))
        extra = json.loads((directory / EXTRA_STATE).read_text())
        self.scheduler.load_state_dict(extra["scheduler"])
        schedule.continue_on(self.scheduler, self.plan.recipe)
        self.skipped = extra["skipped_steps"]
        if self.scaler is not None and extra["scale"] is not None:
            self.scaler.rule = DynamicScale(**extra["scale"])
            self.scaler._scale = None  # re-created at the rule's scale on first use
            self.scaler._init_scale = self.scaler.rule.scale


def _fsdp_plugin(fsdp: dict | None):
    if fsdp is None:
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**fsdp)
