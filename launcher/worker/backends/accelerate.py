"""HF Accelerate behind the Backend interface: DDP, or FSDP for ZeRO stages on GPU.

The engine consumes exactly the plan's accelerate settings (what the dry run
prints; backend_config.accelerate_settings). Gradient accumulation is done here,
autocast and fp16 loss scaling by launcher.worker.precision from the plan's policy
(the settings' `autocast` and `loss_scale` print the same values): the
Accelerator runs with mixed_precision "no", because Accelerate has no autocast
and no GradScaler for fp16 on CPU and its scaler lacks DeepSpeed's hysteresis
and floor: `precision.loss_scale` must mean the same on both backends.

`consolidate_fp32` reads a checkpoint this engine saved back without an engine
(`mplaunch export`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan import hf_dir, schedule
from launcher.plan.loss_scale import ScaleAtMinimum
from launcher.plan.resolve import Plan
from launcher.worker import xray
from launcher.worker.backends import (
    LossScaleFloor,
    StepStats,
    TokenWeights,
    optimizer_state_bytes,
    param_groups,
    tensor_bytes,
    to_device,
)
from launcher.worker.models import loss_of
from launcher.worker.precision import Precision

EXTRA_STATE = "mplaunch_accelerate.json"
# What save_state writes for model 0: DDP and FSDP FULL_STATE_DICT, or FSDP SHARDED_STATE_DICT.
MODEL_FILES = (hf_dir.SAFETENSORS_FILE, hf_dir.TORCH_FILE, "pytorch_model_fsdp.bin")
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"


class Engine:
    """An Accelerate-prepared model and optimizer stepping one optimizer step per `train_step`."""

    def __init__(self, plan: Plan, model: nn.Module) -> None:
        from accelerate import Accelerator

        self.plan = plan
        settings = plan.backend_config
        self.accum = settings["grad_accum"]
        self.clip = settings["grad_clip"]
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
        self.weights = TokenWeights(plan, self.device)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.precision = Precision(
            plan.precision, self.device.type, sharded=settings["fsdp_plugin"] is not None
        )
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
        inner = self.optimizer.optimizer
        self.weights.start(micro_batches)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self.precision.autocast():
                    loss = self.weights(i, loss_of(self.model(**to_device(batch, self.device))))
                self.precision.scale(loss.float() / self.accum).backward()
            total += loss.detach().float()
        if self.measure_grads:
            self.grad_bytes = tensor_bytes([p.grad for p in self.model.parameters()])
        self.precision.unscale_(inner)
        probe = None
        if self.xray:  # the unscaled, unclipped gradients; the scale their backward used
            dtype, scale = self.plan.precision.dtype, self.loss_scale()
            probe = xray.Probe(self.layers, self._shards(), dtype, scale, False, self.xray == "sketch")
            lr = self.lr()
        grad_norm = self.acc.clip_grad_norm_(
            self.model.parameters(), self.clip if self.clip > 0 else float("inf")
        )
        # Without a scaler nothing skips a step with non-finite gradients (deciding on the host
        # would sync every step): the returned grad_norm marks it in the Meter, on the device, and
        # the check at the next log interval or save stops the run before any of it is saved.
        try:
            skipped = self.precision.step(inner)
        except ScaleAtMinimum as exc:
            raise LossScaleFloor(str(exc)) from None
        self.skipped += int(bool(skipped))
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
        inner: torch.optim.Optimizer = self.optimizer.optimizer
        return inner

    def fp32_masters(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """This rank's fp32 master weights (the parameters, FSDP's shards), each with its param group."""
        return [(p, g) for g in self.torch_optimizer().param_groups for p in g["params"]]

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
                "scale": self.precision.state_dict(),
            }
            (directory / EXTRA_STATE).write_text(json.dumps(extra))

    def load(self, directory: Path) -> None:
        self.acc.load_state(str(directory))
        extra = json.loads((directory / EXTRA_STATE).read_text())
        self.scheduler.load_state_dict(extra["scheduler"])
        schedule.continue_on(self.scheduler, self.plan.recipe)
        self.skipped = extra["skipped_steps"]
        self.precision.load_state_dict(extra["scale"])


def _fsdp_plugin(fsdp: dict | None):
    if fsdp is None:
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**fsdp)


def consolidate_fp32(directory: Path, plan: Plan) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) in checkpoint `directory`, as `Engine.save` wrote them.

    Under autocast the parameters are the fp32 master weights, so the model file save_state wrote
    is the answer: pytorch_model.bin (DDP, FSDP FULL_STATE_DICT), or FSDP's sharded
    pytorch_model_fsdp_0/ merged with torch.distributed.checkpoint.

    Raises:
        UserError: no model file from save_state in `directory`.
    """
    for name in MODEL_FILES:
        if (directory / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(directory / name)
            loaded: dict[str, torch.Tensor] = torch.load(
                directory / name, map_location="cpu", weights_only=True
            )
            return loaded
    if (directory / SHARDED_MODEL_DIR).is_dir():  # FSDP SHARDED_STATE_DICT: merge the shards
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(directory / SHARDED_MODEL_DIR, Path(tmp) / "model.pt")
            merged = torch.load(Path(tmp) / "model.pt", map_location="cpu", weights_only=True)
        return dict(merged.get("model", merged))
    raise UserError(f"{directory}: no model file from Accelerate's save_state ({', '.join(MODEL_FILES)})")
