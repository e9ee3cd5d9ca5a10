"""The backend configuration generated from the recipe's one precision/ZeRO source of truth.

Pure functions on the light side: the dry run prints exactly what the
workers will hand to DeepSpeed or Accelerate. (They live here rather than in
`backends/` so that the launcher never imports a module that imports torch.)
"""

from __future__ import annotations

from typing import Any

from launcher.precision import PrecisionPolicy, deepspeed_fp16_block, grad_scaler_settings
from launcher.recipe import Recipe


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
    """Accelerator arguments, FSDP sharding for ZeRO stages, and the fp16 loss scaler."""
    z = recipe.zero
    mixed = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[policy.dtype]
    if z.stage == 0 or device == "cpu":
        sharding = "DDP"
        fsdp = None
    else:
        sharding = "FSDP"
        # FSDP has no optimizer-only sharding: stage 1 runs as ZeRO-2 (SHARD_GRAD_OP).
        fsdp = {
            "sharding_strategy": "FULL_SHARD" if z.stage == 3 else "SHARD_GRAD_OP",
            "cpu_offload": z.offload_params,
            "use_orig_params": True,
        }
    return {
        "mixed_precision": mixed,
        "gradient_accumulation_steps": accum,
        "max_grad_norm": recipe.train.grad_clip,
        "distributed": sharding,
        "fsdp": fsdp,
        "grad_scaler": grad_scaler_settings(policy),
    }
