"""The backend configuration generated from the recipe's one precision/ZeRO source of truth.

Pure functions on the light side: the dry run prints exactly what the
workers will hand to DeepSpeed or Accelerate. (They live here rather than in
`backends/` so that the launcher never imports a module that imports torch.)
"""

from __future__ import annotations

from typing import Any

from launcher.plan.precision import PrecisionPolicy, deepspeed_fp16_block
from launcher.recipe.schema import Recipe


def deepspeed_config(
    recipe: Recipe, policy: PrecisionPolicy, device: str, micro: int, accum: int, global_: int
) -> dict[str, Any]:
    """The complete DeepSpeed config dict for this run."""
    z, opt = recipe.zero, recipe.optimizer
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device == "cuda")
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if z.stage == 3:
        # Lets a stage-3 run also write consolidated 16-bit weights at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": list(opt.betas),
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
        "adam_w_mode": True,
    }
    if not z.offload_optimizer:
        # torch's AdamW (fused on CUDA) instead of DeepSpeed's FusedAdam, which
        # needs a compiled op; with offload DeepSpeed's CPU Adam is required.
        optimizer_params["torch_adam"] = True
        if device == "cuda":
            optimizer_params["fused"] = True
    return {
        "train_batch_size": global_,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.train.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "fp16": deepspeed_fp16_block(policy),
        "bf16": {"enabled": policy.dtype == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # mplaunch logs its own metrics; keep DeepSpeed's per-step print quiet.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def accelerate_settings(recipe: Recipe, policy: PrecisionPolicy, device: str, accum: int) -> dict[str, Any]:
    """Everything the accelerate engine consumes: Accelerator and FSDP plugin arguments, autocast,
    the fp16 loss scale, accumulation, clipping and the optimizer.

    mplaunch, not Accelerate, owns autocast and the loss scaler: Accelerate has neither for fp16
    on CPU, and its scaler lacks DeepSpeed's hysteresis and floor, so `precision.loss_scale`
    would mean something else on each backend. The Accelerator therefore runs with
    mixed_precision "no" and never wraps the forward pass itself.
    """
    z, opt = recipe.zero, recipe.optimizer
    fsdp = None
    if z.stage > 0 and device == "cuda":
        fsdp = {
            # FSDP has no optimizer-only sharding: stage 1 runs as ZeRO-2 (SHARD_GRAD_OP).
            "sharding_strategy": "FULL_SHARD" if z.stage == 3 else "SHARD_GRAD_OP",
            "cpu_offload": z.offload_params,
            "use_orig_params": True,
            "auto_wrap_policy": "transformer_based_wrap",
            "state_dict_type": "SHARDED_STATE_DICT",
            # The sharded parameters stay fp32 (the master weights); FSDP gathers them for
            # compute, and reduces gradients, in the 16-bit dtype.
            "mixed_precision_policy": policy.dtype if policy.autocast else None,
        }
    return {
        "accelerator": {"mixed_precision": "no", "cpu": device == "cpu"},
        "fsdp_plugin": fsdp,
        "autocast": policy.dtype if policy.autocast else None,
        "loss_scale": policy.loss_scale.model_dump() if policy.loss_scale else None,
        "grad_accum": accum,
        "grad_clip": recipe.train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            "fused": device == "cuda",
        },
    }
