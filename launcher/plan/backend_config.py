"""The backend configuration generated from the recipe's one precision/ZeRO source of truth.

Pure functions on the light side: the dry run prints exactly what the
workers will hand to DeepSpeed or Accelerate. (They live here rather than in
`backends/` so that the launcher never imports a module that imports torch.)
"""

from __future__ import annotations

from typing import Any

from launcher.plan.precision import PrecisionPolicy, deepspeed_fp16_block
from launcher.recipe.families import FAMILIES
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
        "bf16": {"enabled": policy.compute_dtype == "bf16"},  # fp8: bf16 outside the fp8 matmuls
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # mplaunch logs its own metrics; keep DeepSpeed's per-step print quiet.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def accelerate_settings(recipe: Recipe, policy: PrecisionPolicy, device: str, accum: int) -> dict[str, Any]:
    """Everything the accelerate engine consumes: Accelerator arguments, the FSDP2 sharding
    (`fsdp2`, None at zero.stage 0: DDP), autocast, the fp16 loss scale, accumulation, clipping
    and the optimizer.

    mplaunch, not Accelerate, owns autocast and the loss scaler: Accelerate has neither for fp16
    on CPU, and its scaler lacks DeepSpeed's hysteresis and floor, so `precision.loss_scale`
    would mean something else on each backend. The Accelerator therefore runs with
    mixed_precision "no" and never wraps the forward pass itself.
    """
    z, opt = recipe.zero, recipe.optimizer
    return {
        "accelerator": {"mixed_precision": "no", "cpu": device == "cpu"},
        "fsdp2": fsdp2_settings(recipe, policy, device) if z.stage > 0 else None,
        "autocast": policy.compute_dtype if policy.autocast else None,
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


def fsdp2_settings(recipe: Recipe, policy: PrecisionPolicy, device: str) -> dict[str, Any]:
    """How the accelerate engine applies torch's `fully_shard` (FSDP2) for zero.stage 1-3, on
    every device: mplaunch shards the model itself (launcher.worker.backends.fsdp2), never through
    Accelerate's FSDP plugin, which Accelerate turns into DDP on CPU.

    Parameters, gradients and AdamW state are sharded on dim 0 in fp32 at every stage (the shards
    are the master weights). Stage 3 frees the gathered parameters after each unit's forward and
    gathers them again for its backward; stage 2 keeps them from forward to backward; FSDP2 has no
    optimizer-only mode, so stage 1 runs as stage 2 (the plan warns). In 16 bits the parameters are
    gathered in that dtype and the gradients reduce-scattered in fp32 (MixedPrecisionPolicy);
    fp32 runs without a policy. Parameter offload (CPUOffloadPolicy) applies on GPUs only.
    """
    z = recipe.zero
    return {
        "reshard_after_forward": z.stage == 3,
        "param_dtype": policy.compute_dtype,
        "reduce_dtype": "fp32",
        "offload_params": z.offload_params and device == "cuda",
        "wrap": fsdp2_wrap(recipe),
    }


def fsdp2_wrap(recipe: Recipe) -> str:
    """Which modules `fully_shard` makes units of, in the words the worker's record uses."""
    name = recipe.model.name if recipe.model.target is None and recipe.model.hf is None else None
    if name is None:
        return (
            "each module whose class is in the model's _no_split_modules (none listed: each transformers "
            "GradientCheckpointingLayer) but one sharing a weight with a module outside it, then the root; "
            "the root alone if there are none"
        )
    block = FAMILIES[name].block
    if not block:
        return f"the root alone ({name} has no transformer blocks)"
    return f"each {block}, then the root"
