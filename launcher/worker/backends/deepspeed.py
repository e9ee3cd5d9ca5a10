"""DeepSpeed behind the Backend interface: ZeRO 0-3, offload, fp16 dynamic loss scaling, bf16.

The engine is configured entirely by the plan's generated DeepSpeed config
(the one the dry run prints); only the model, its parameter groups and the
LR schedule are handed over in code. DeepSpeed scales the fp16 loss itself.

`consolidate_fp32` reads a checkpoint this engine saved back without an engine
(`mplaunch export`), whatever the stage:

    ZeRO 1-3      the `*_optim_states.pt` shards, through DeepSpeed's own zero_to_fp32
                  (ZeRO 1-2: `single_partition_of_fp32_groups`, ZeRO-3: `fp32_flat_groups`;
                  DeepSpeed's BF16_Optimizer writes the same ZeRO-1 layout)
    stage 0       no optimizer shards: in fp32 the module in mp_rank_00_model_states.pt is
                  the weights; in bf16/fp16 the fp32 masters are that file's optimizer state
                  (`fp32_groups` per parameter, or `fp32_groups_flat` per group), in the
                  order of the parameter groups the engine was given (`param_groups`)

Where the checkpoint also holds the module's own (16-bit, or fp32) weights, every master must
round to exactly those: a consolidation that disagrees is refused rather than written.

deepspeed is imported where it is used: a CPU process must name DeepSpeed's accelerator
(DS_ACCELERATOR) before the import, and the worker and export each do so first.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.plan import schedule
from launcher.plan.resolve import Plan
from launcher.worker import audit, xray
from launcher.worker.backends import (
    LossScaleFloor,
    SkippedStep,
    StepStats,
    TokenWeights,
    non_finite_message,
    optimizer_state_bytes,
    param_groups,
    tensor_bytes,
    to_device,
    universal,
)
from launcher.worker.models import loss_of

if TYPE_CHECKING:
    import deepspeed

TAG = "deepspeed"
# DeepSpeed's file names (deepspeed.utils.zero_to_fp32 reads the same ones).
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
# Where DeepSpeed's optimizers keep this rank's fp32 master weights and gradient partitions
# in every configuration mplaunch generates.
_MASTER = (
    "single_partition_of_fp32_groups",  # ZeRO 1 and 2
    "fp32_partitioned_groups_flat",  # ZeRO 3
    "fp32_groups_flat_partition",  # the bf16 optimizer
    "fp32_groups_flat",  # stage 0 fp16/bf16 (FP16_Optimizer)
    "fp32_groups",  # stage 0 fp16/bf16 without fused ops (FP16_UnfusedOptimizer, e.g. on CPU)
)
_GRADS = (
    "grads_in_partition",
    "averaged_gradients",
    "grad_partitions_flat_buffer",
    "fp32_groups_gradients_flat",
    "all_grad_tensors",  # stage 1-2: this rank's partition of the gradients, kept between micro-batches
)


class Engine:
    """A DeepSpeed engine stepping one optimizer step per `train_step`."""

    def __init__(self, plan: Plan, model: nn.Module) -> None:
        import deepspeed

        self.plan = plan
        groups = param_groups(model, plan.recipe.optimizer.weight_decay)
        factor = schedule.factor(plan.recipe)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=dict(plan.backend_config),
        )
        _undo_prestep(self.engine.optimizer)  # before any checkpoint is loaded into it
        if plan.recipe.train.compile:
            self.engine.compile()  # torch.compile of the wrapped module, hooks kept in place
        self.model = self.engine
        self.device = self.engine.device
        self.weights = TokenWeights(plan, self.device)
        self.grad_bytes: int | None = None
        self.measure_grads = False
        # DeepSpeed's ZeRO and 16-bit optimizers report the global gradient norm; a plain torch
        # optimizer (ZeRO 0 in fp32) leaves it None, so the norm is taken here before the step.
        self.own_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        self.xray: str | None = None
        self.layers = xray.layers_of(list(self.engine.module.named_parameters()))

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepStats:
        total = torch.zeros((), device=self.device)
        skipped_before = self.engine.skipped_steps
        probe = None
        self.weights.start(micro_batches)
        for i, batch in enumerate(micro_batches):
            loss = self.weights(i, loss_of(self.engine(**to_device(batch, self.device))))
            self.engine.backward(loss)
            last = i == len(micro_batches) - 1
            if self.measure_grads:  # the most any micro-batch's backward left held
                self.grad_bytes = max(self.grad_bytes or 0, self._grad_bytes())
            if self.own_norm and last:
                own_norm = _grad_norm(self.engine.module.parameters())  # reduced already, before clipping
            if self.xray and last:  # reduced, still scaled in fp16, not yet clipped
                dtype, scale = self.plan.precision.compute_dtype, self.loss_scale()
                probe = xray.Probe(
                    self.layers, _shards(self.engine), dtype, scale, True, self.xray == "sketch"
                )
                lr = self.lr()
            try:
                self.engine.step()
            except Exception as exc:
                if "loss scale already at minimum" in str(exc):
                    raise LossScaleFloor(str(exc)) from None
                raise
            total += loss.detach().float()
        scaled = self.plan.precision.loss_scale is not None
        skipped = self.engine.skipped_steps > skipped_before  # a host int: free to read
        if skipped and not scaled:
            # DeepSpeed skips a step with non-finite gradients in fp32 and bf16 too, and would
            # go on skipping without a word: there is no loss scale for a skip to lower.
            raise self._skipped(total)
        grad_norm = own_norm if self.own_norm else self.engine.get_global_grad_norm()
        seen = probe.finish(not skipped, lr, _world()) if probe is not None else None
        return StepStats(total / len(micro_batches), grad_norm, skipped if scaled else None, seen)

    def _skipped(self, loss_sum: torch.Tensor) -> SkippedStep:
        """The error for a step DeepSpeed skipped outside fp16 loss scaling (every rank skips it alike)."""
        bad = (~torch.isfinite(loss_sum)).float()
        if torch.distributed.is_initialized():  # so every rank names the same cause
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        step = int(self.engine.global_steps)  # already counts the skipped step
        message = non_finite_message(
            step, self.plan.precision.dtype, loss_finite=not bad.item(), skipped_by="DeepSpeed"
        )
        return SkippedStep(message)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.engine.eval()
        try:
            return loss_of(self.engine(**to_device(batch, self.device))).detach().float()
        finally:
            self.engine.train()

    def loss_scale(self) -> float | None:
        if self.plan.precision.loss_scale is None:
            return None
        opt = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(opt, attr, None)
            if isinstance(value, (int, float)):
                return float(value)
        return float(opt.loss_scaler.cur_scale)

    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    def torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def fp32_masters(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """ZeRO-3 hands the inner optimizer each partition only while it steps: those, else its parameters."""
        opt, groups = self.engine.optimizer, self.torch_optimizer().param_groups
        flats = getattr(opt, "fp32_partitioned_groups_flat", None)
        if flats is not None:
            return [(f, groups[opt.sub_group_to_group_id[i]]) for i, f in enumerate(flats)]
        return [(p, g) for g in groups for p in g["params"]]

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _grad_bytes(self) -> int:
        opt = self.engine.optimizer
        return tensor_bytes(
            [[p.grad, getattr(p, "grad_accum", None)] for p in self.engine.module.parameters()],
            [getattr(opt, a, None) for a in _GRADS],
        )

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters (at ZeRO-3 its partition plus what it keeps whole),
        fp32 master weights not aliasing those, optimizer state, and gradients as they stood at
        the accumulation boundary before the optimizer step. Each storage counts once."""
        opt = self.engine.optimizer
        seen: set[int] = set()
        params = [[getattr(p, "ds_tensor", None), p] for p in self.engine.module.parameters()]
        return {
            "params": tensor_bytes(params, seen=seen),
            "master": tensor_bytes([getattr(opt, a, None) for a in _MASTER], seen=seen),
            "optimizer": optimizer_state_bytes(getattr(opt, "optimizer", opt), seen=seen),
            "grads": self.grad_bytes if self.grad_bytes is not None else -1,
        }

    def save(self, directory: Path) -> None:
        """Every rank writes its shard of the model and optimizer state into `directory`."""
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load(self, directory: Path, saved_world: int) -> str | None:
        """At another world size, ZeRO 1-3 go through DeepSpeed's universal checkpoint (universal.py)."""
        note = universal.load_checkpoint(self.engine, directory, TAG, saved_world)
        # Also undoes DeepSpeed's ZeRO-3 universal loader giving every parameter group the first
        # group's hyperparameters (its weight decay to the biases and norms).
        schedule.continue_on(self.engine.lr_scheduler, self.plan.recipe)
        return note


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _shards(engine: deepspeed.DeepSpeedEngine) -> list[xray.Shard]:
    """This rank's parts of the reduced gradients and fp32 master weights, between backward and step.

    ZeRO-3 partitions and the fragments of ZeRO 1-2 and the bf16 optimizer are this rank's alone;
    at ZeRO 0 the gradient is whole on every rank, which takes its slice of it and of the master
    weight (the parameter itself in fp32, else the 16-bit optimizer's flat fp32 copy).
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    rank, world = (torch.distributed.get_rank(), _world()) if torch.distributed.is_initialized() else (0, 1)
    masters = _live_stage0_masters(engine.optimizer)
    out = []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        layer = xray.layer_of(name)
        if hasattr(p, "ds_id"):
            # The partition is padded to an equal size on every rank: keep this rank's real elements.
            grad, master = safe_get_local_grad(p).reshape(-1), safe_get_local_fp32_param(p).reshape(-1)
            real = max(0, min(grad.numel(), p.ds_numel - rank * grad.numel()))
            out.append(xray.Shard(layer, grad[:real], master[:real], rank * grad.numel()))
        elif hasattr(p, "_hp_mapping"):
            mapping = p._hp_mapping
            if mapping is None:  # no part of this parameter is in this rank's partition
                continue
            grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            where = mapping.lp_fragment_address
            if grad.numel() == p.numel():  # the bf16 optimizer accumulates the whole gradient on every rank
                grad = grad.narrow(0, where.start, where.numel)
            out.append(xray.Shard(layer, grad, mapping.get_hp_fragment().reshape(-1), where.start))
        elif p.grad is not None:
            master = p if p.dtype == torch.float32 else masters.get(id(p))
            mine = xray.my_slice(master, rank, world) if master is not None else None
            start = xray.slice_start(p.numel(), rank, world)
            out.append(xray.Shard(layer, xray.my_slice(p.grad, rank, world), mine, start))
    return out


def _undo_prestep(opt: object) -> None:
    """Undo the step DeepSpeed's stage-0 16-bit optimizers (FP16_Optimizer, fused, and FP16_UnfusedOptimizer,
    for fp16 and bf16) take on zero gradients when built: Adam's counter would read 1 before training, its
    first update move a weight by 0.735 x lr (betas 0.9/0.95), and AdamW's decay have shrunk the fp32
    masters once. ZeRO 1-3 do not pre-step. The state becomes a never-stepped one and each master is
    copied back from the 16-bit weight it was cloned from (its exact value before that step)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)) or not audit.fresh_state(opt.optimizer):
        return
    with torch.no_grad():
        for i, params in enumerate(opt.fp16_groups):
            if isinstance(opt, FP16_Optimizer):
                opt.fp32_groups_flat[i].copy_(opt.fp16_groups_flat[i])
            else:
                for master, p in zip(opt.fp32_groups[i], params, strict=True):
                    master.copy_(p)


def _live_stage0_masters(opt: object) -> dict[int, torch.Tensor]:
    """ZeRO 0's 16-bit optimizer (FP16_Optimizer, also for bf16): each parameter's fp32 master weight."""
    out: dict[int, torch.Tensor] = {}
    groups = getattr(opt, "fp16_groups", None) or []
    flat, unflat = getattr(opt, "fp32_groups_flat", None), getattr(opt, "fp32_groups", None)
    for i, params in enumerate(groups):
        offset = 0
        for j, p in enumerate(params):
            if flat:
                out[id(p)] = flat[i].narrow(0, offset, p.numel())
            elif unflat:
                out[id(p)] = unflat[i][j].reshape(-1)
            offset += p.numel()
    return out


def _grad_norm(parameters: Iterator[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of the gradients, on the device (no host sync)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2)


# --------------------------------------------------------------------------- reading a checkpoint


def consolidate_fp32(directory: Path, plan: Plan) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) in checkpoint `directory`, as `Engine.save` wrote them,
    under the trained module's names (see the module's docstring for each stage's layout).

    Raises:
        UserError: no DeepSpeed checkpoint files, or masters that do not fit the model or do
            not round to the module weights the checkpoint holds.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # unpickling the checkpoint imports deepspeed
    ds_dir = directory / TAG
    if not (ds_dir / MODEL_STATES).is_file() and not any(ds_dir.glob(OPTIM_STATES_GLOB)):
        raise UserError(f"{ds_dir}: no DeepSpeed checkpoint files")
    if any(ds_dir.glob(OPTIM_STATES_GLOB)):  # ZeRO 1-3 (and BF16_Optimizer): DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
        model_file = ds_dir / MODEL_STATES  # ZeRO 1-2; ZeRO-3 writes one per rank, all alike
        if not model_file.is_file():
            model_file = ds_dir / ZERO3_MODEL_STATES
        module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    else:
        saved = torch.load(ds_dir / MODEL_STATES, map_location="cpu", weights_only=False)
        module = saved["module"]
        state = _stage0_masters(plan, module, saved.get("optimizer") or {})
    _check_against_module(state, module)
    # Tensors without a master (buffers, frozen parameters) are the module's own.
    return {**{k: v.float() if v.is_floating_point() else v for k, v in module.items()}, **state}


def _stage0_masters(
    plan: Plan, module: dict[str, torch.Tensor], opt: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Stage 0: fp32 keeps no separate masters (the module is the weights); bf16 and fp16 run
    DeepSpeed's FP16 optimizer, whose fp32 copies follow the order of the parameter groups.

    Raises:
        launcher.worker.models.ModelError: the plan's model cannot be built (to learn that order).
    """
    if "fp32_groups" in opt:
        groups = [list(g) for g in opt["fp32_groups"]]
    elif "fp32_groups_flat" in opt:
        groups = [[flat] for flat in opt["fp32_groups_flat"]]  # split below, once the shapes are known
    else:
        low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
        if low:
            raise UserError(
                f"no fp32 master weights in the stage-0 checkpoint, and {low[0]} is {module[low[0]].dtype}"
            )
        return dict(module)
    from launcher.worker.model_setup import model_for

    # Freshly initialised: only its parameters' order counts.
    model = model_for(plan, load_init=False, fp8=False)[0]
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied parameter has two names
        names.setdefault(id(param), []).append(name)
    params = [g["params"] for g in param_groups(model, 0.0) if g["params"]]  # DeepSpeed drops empty groups
    if len(params) != len(groups):
        raise UserError(f"the checkpoint has {len(groups)} parameter groups, the model {len(params)}")
    state: dict[str, torch.Tensor] = {}
    for group, masters in zip(params, groups, strict=True):
        if len(masters) == 1 and len(group) > 1:  # a flat group
            sizes = [p.numel() for p in group]
            masters = list(torch.split(masters[0][: sum(sizes)], sizes))
        if len(masters) != len(group):
            raise UserError(f"a parameter group has {len(masters)} fp32 masters for {len(group)} parameters")
        for param, master in zip(group, masters, strict=True):
            for name in names[id(param)]:
                state[name] = master.view(param.shape)
    return state


def _check_against_module(state: dict[str, torch.Tensor], module: dict[str, torch.Tensor]) -> None:
    """Every master must round to the module weights the run held (ZeRO-3 holds none whole)."""
    for name, master in state.items():
        held = module.get(name)
        if held is None or held.shape != master.shape or not held.is_floating_point():
            continue  # ZeRO-3's module holds empty placeholders
        if not torch.equal(master.to(held.dtype), held):
            raise UserError(
                f"the consolidated fp32 master of {name} does not round to the module's {held.dtype} weights "
                "in the checkpoint; not exporting weights that cannot be confirmed"
            )
