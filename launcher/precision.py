"""Precision modes: which dtype a run computes in and what that demands of the hardware.

Shared by the plan (which must reject impossible combinations before any
process starts) and by both backends. Master weights and optimizer state are
always fp32; only the forward/backward compute dtype changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from launcher.hardware import Hardware
from launcher.recipe import LossScale, Recipe

Dtype = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """The resolved precision of a run."""

    dtype: Dtype
    reason: str
    allow_tf32: bool
    loss_scale: LossScale

    master_dtype: str = "fp32"

    @property
    def uses_loss_scaling(self) -> bool:
        # bf16 has fp32's exponent range, so its gradients do not underflow.
        return self.dtype == "fp16"


def resolve(recipe: Recipe, device: str, hardware: Hardware) -> PrecisionPolicy:
    """Turn `precision.dtype` (maybe `auto`) into a concrete policy for `device`."""
    p = recipe.precision
    if p.dtype != "auto":
        dtype, reason = p.dtype, "set in the recipe"
    elif device == "cpu":
        dtype, reason = "bf16", "auto: bf16 on CPU"
    elif all(g.supports_bf16 for g in hardware.gpus):
        dtype, reason = "bf16", "auto: every visible GPU is Ampere or newer"
    else:
        dtype, reason = "fp16", "auto: a visible GPU predates Ampere (no bf16)"
    return PrecisionPolicy(dtype, reason, p.allow_tf32, p.loss_scale)


def problems(policy: PrecisionPolicy, backend: str, device: str, hardware: Hardware) -> list[str]:
    """What the backend would reject at run time for this policy on this device."""
    out = []
    if device == "cpu" and policy.dtype == "fp16" and backend == "deepspeed":
        out.append(
            "precision.dtype: fp16 is not supported by DeepSpeed on CPU; "
            "use precision.dtype=bf16, or backend=accelerate (which scales fp16 on CPU)"
        )
    if device == "cuda" and policy.dtype == "bf16":
        old = [g for g in hardware.gpus if not g.supports_bf16]
        if old:
            out.append(
                f"precision.dtype: bf16 needs an Ampere or newer GPU, but GPU {old[0].index} ({old[0].name}) "
                f"is compute capability {old[0].capability[0]}.{old[0].capability[1]}; use precision.dtype=fp16"
            )
    return out


def deepspeed_fp16_block(policy: PrecisionPolicy) -> dict[str, Any]:
    """DeepSpeed's `fp16` section: all six loss-scale knobs from `precision.loss_scale`."""
    ls = policy.loss_scale
    return {
        "enabled": policy.dtype == "fp16",
        # DeepSpeed reads loss_scale 0 as "dynamic"; any other value is a static scale.
        "loss_scale": 0 if ls.dynamic else ls.initial,
        "initial_scale_power": int(round(_log2(ls.initial))),
        "loss_scale_window": ls.window,
        "hysteresis": ls.hysteresis,
        "consecutive_hysteresis": ls.consecutive_hysteresis,
        # DeepSpeed's min_loss_scale is an int field (the recipe rules make it whole).
        "min_loss_scale": int(ls.min) if ls.min == int(ls.min) else ls.min,
    }


def grad_scaler_settings(policy: PrecisionPolicy) -> dict[str, Any]:
    """The same loss-scale fields for the accelerate backend's scaler, named as torch's GradScaler names them.

    torch's GradScaler unscales, checks for inf/NaN and skips the step; its own
    rule (halve on every overflow, no floor, no static mode) is replaced by
    launcher.loss_scale.DynamicScale, which follows DeepSpeed's: hysteresis,
    a minimum that stops the run, and a static scale when dynamic is false.
    """
    ls = policy.loss_scale
    return {
        "enabled": policy.dtype == "fp16",
        "dynamic": ls.dynamic,
        "init_scale": ls.initial,
        # DeepSpeed's dynamic scaler doubles and halves; match it.
        "growth_factor": 2.0 if ls.dynamic else 1.0,
        "backoff_factor": 0.5 if ls.dynamic else 1.0,
        "growth_interval": ls.window,
        "hysteresis": ls.hysteresis,
        "consecutive_hysteresis": ls.consecutive_hysteresis,
        "min_scale": ls.min,
    }


def _log2(x: float) -> float:
    import math

    return math.log2(x)
