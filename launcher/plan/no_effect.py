"""Settings that would silently have no effect: the plan's warnings, one line each (`Plan.warnings`)."""

from __future__ import annotations

from launcher.plan import extras
from launcher.plan.hf_dir import HfModel
from launcher.plan.precision import PrecisionPolicy
from launcher.recipe.schema import explicitly_set
from launcher.recipe.sections import Recipe


def warnings(
    recipe: Recipe, policy: PrecisionPolicy, device: str, language_model: bool, hf: HfModel | None
) -> list[str]:
    """Settings that would silently have no effect (logging.tensorboard without tensorboard), then what
    the plan could not check.

    Args:
        language_model: mplaunch takes the model's loss (`ModelFacts.language_model`): train.loss applies.
        hf: model.hf as the plan read it (a hub id cannot be read).
    """
    written = explicitly_set(recipe)
    out = _precision(written, policy, device)
    z = recipe.zero
    if device == "cpu" and (z.offload_optimizer or z.offload_params):
        key = "zero.offload_optimizer" if z.offload_optimizer else "zero.offload_params"
        out.append(f"{key}: the run is on the CPU already; offloading gains nothing")
    if recipe.backend == "accelerate" and z.stage == 1:
        out.append(
            "zero.stage: FSDP2 has no optimizer-only mode; stage 1 runs as stage 2 (parameters, "
            "gradients and optimizer state sharded, no reshard after forward)"
        )
    t = recipe.train
    if "train.loss" in written and not language_model:
        out.append("train.loss: has no effect: the model is not a language model mplaunch takes the loss of")
    if "train.loss_normalization" in written and not language_model:
        out.append(
            "train.loss_normalization: has no effect: the model computes its own loss, a mean per "
            "micro-batch, and those means are averaged over the step (as batch)"
        )
    if "scheduler.warmup_style" in written and recipe.scheduler.warmup_steps == 0:
        out.append("scheduler.warmup_style: has no effect without warm-up (scheduler.warmup_steps is 0)")
    if recipe.scheduler.warmup_steps > t.max_steps:
        out.append(
            f"scheduler.warmup_steps: {recipe.scheduler.warmup_steps} is more than train.max_steps {t.max_steps};"
            " the learning rate never reaches optimizer.lr"
        )
    if t.eval_every > t.max_steps:
        out.append(
            f"train.eval_every: {t.eval_every} is beyond train.max_steps {t.max_steps}; no evaluation will run"
        )
    if recipe.checkpoint.every_steps > t.max_steps:
        out.append("checkpoint.every_steps: beyond train.max_steps; only the final checkpoint is written")
    return out + _trackers(recipe, written) + extras.warnings(recipe) + _hub(hf)


def _trackers(recipe: Recipe, written: set[str]) -> list[str]:
    """logging.wandb.* or logging.mlflow.* set while that tracker is not in logging.trackers."""
    out = []
    for name in ("wandb", "mlflow"):
        keys = sorted(k for k in written if k.startswith(f"logging.{name}."))
        if keys and name not in recipe.logging.enabled_trackers:
            out.append(f"{keys[0]}: has no effect: logging.trackers does not list {name}")
    return out


def _precision(written: set[str], policy: PrecisionPolicy, device: str) -> list[str]:
    out = []
    scale_keys = sorted(k for k in written if k.startswith("precision.loss_scale."))
    if scale_keys and policy.dtype != "fp16":
        out.append(f"{scale_keys[0]}: has no effect with {policy.dtype} (only fp16 scales the loss)")
    dynamic_only = [
        k
        for k in scale_keys
        if k.rsplit(".", 1)[1] in ("window", "hysteresis", "consecutive_hysteresis", "min")
    ]
    if dynamic_only and policy.loss_scale is not None and not policy.loss_scale.dynamic:
        out.append(
            f"{dynamic_only[0]}: has no effect with a static loss scale (precision.loss_scale.dynamic=false)"
        )
    fp8_keys = sorted(k for k in written if k.startswith("precision.fp8."))
    if fp8_keys and policy.dtype != "fp8":
        out.append(f"{fp8_keys[0]}: has no effect with {policy.dtype} (only precision.dtype fp8 reads it)")
    if "precision.allow_tf32" in written and (policy.dtype != "fp32" or device == "cpu"):
        out.append("precision.allow_tf32: only affects fp32 runs on Ampere or newer GPUs")
    return out


def _hub(hf: HfModel | None) -> list[str]:
    """model.hf named a hub id: the plan could not read it."""
    if hf is None or hf.local:
        return []
    return [
        f"model.hf: {hf.source} is no local directory, so it is a hub id: the workers download it "
        "(check could not read its config or tokenizer)"
    ]
