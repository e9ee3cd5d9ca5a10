"""The precision contract: decided once, in the plan, and read by everyone else.

`resolve` turns the recipe's `precision` section and the planned hardware into
a `PrecisionPolicy`: the compute dtype (and why), whether autocast runs,
whether TF32 is allowed, the loss-scale settings in the recipe's own names
(only for fp16), and whether the planned hardware has bf16. The plan
serialises it whole into plan.json; the backends, metrics, the memory planner,
the FLOP counter and the health checks read it and never re-derive it.
Master weights and optimizer state are always fp32.

fp8 (torchao float8) is a linear-layer choice on top of bf16: the chosen linear layers multiply in
fp8, everything else computes in bf16 (`compute_dtype`). Which layers, the scaling recipe and
whether the run is emulated are `PrecisionPolicy.fp8` (filled by launcher.plan.fp8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from launcher.plan.hardware import Hardware
from launcher.recipe.schema import LossScale, Recipe

Dtype = Literal["fp32", "fp16", "bf16", "fp8"]

#: The closed vocabulary of dtype names used across mplaunch (recipe, plan, export,
#: worker), each with its width in bytes. launcher.worker.precision maps the same
#: names to torch dtypes. fp8 is not among them: its `compute_dtype` is bf16.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class PrecisionPolicy:
    """The resolved precision of a run.

    Attributes:
        dtype: the forward/backward compute dtype.
        reason: why this dtype (the recipe, or what `auto` found).
        allow_tf32: fp32 matrix products may use TF32 tensor cores.
        loss_scale: the fp16 loss-scale settings, named as in the recipe; None unless fp16.
        bf16_supported: the planned devices compute in bf16 (every GPU Ampere or newer; any CPU).
        fp8: with dtype fp8, the float8 settings and layers (launcher.plan.fp8.settings: scaling,
            keep_first_last, keep, converted (None: decided in the worker), kept {name: reason},
            emulated, all_gather); else None.
    """

    dtype: Dtype
    reason: str
    allow_tf32: bool
    loss_scale: LossScale | None
    bf16_supported: bool
    master_dtype: str = "fp32"
    fp8: dict[str, Any] | None = None

    @property
    def compute_dtype(self) -> str:
        """The dtype of everything but fp8's converted matrix products (a DTYPE_BYTES name): bf16 for fp8."""
        return "bf16" if self.dtype == "fp8" else self.dtype

    @property
    def autocast(self) -> bool:
        """Compute runs under autocast in a 16-bit dtype; fp32 runs without it."""
        return self.dtype != "fp32"

    @property
    def matmul_dtype(self) -> str:
        """The PEAK_TFLOPS column the run's matmuls use: fp32 with TF32 allowed runs at the tf32 peak."""
        return "tf32" if self.dtype == "fp32" and self.allow_tf32 else self.dtype  # fp8: its own column

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "reason": self.reason,
            "allow_tf32": self.allow_tf32,
            "loss_scale": self.loss_scale.model_dump() if self.loss_scale else None,
            "bf16_supported": self.bf16_supported,
            "master_dtype": self.master_dtype,
            "fp8": self.fp8,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionPolicy:
        scale = data["loss_scale"]
        return cls(
            dtype=data["dtype"],
            reason=data["reason"],
            allow_tf32=data["allow_tf32"],
            loss_scale=LossScale(**scale) if scale is not None else None,
            bf16_supported=data["bf16_supported"],
            master_dtype=data["master_dtype"],
            fp8=data.get("fp8"),
        )


def resolve(recipe: Recipe, device: str, hardware: Hardware) -> PrecisionPolicy:
    """Turn `precision.dtype` (maybe `auto`) into the policy for `device` on `hardware`."""
    p = recipe.precision
    # PyTorch computes bf16 on any CPU: natively with AVX512-BF16 or AMX, emulated (slower) otherwise.
    bf16 = True if device == "cpu" else bool(hardware.gpus) and all(g.supports_bf16 for g in hardware.gpus)
    if p.dtype != "auto":
        dtype, reason = p.dtype, "set in the recipe"
    elif device == "cpu" and hardware.cpu_bf16:
        dtype, reason = "bf16", "auto: this CPU has native bf16 (AVX512-BF16 or AMX)"
    elif device == "cpu":
        dtype, reason = (
            "fp32",
            "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated",
        )
    elif not hardware.gpus:
        # Planned here for GPUs elsewhere (a Slurm login node): assume the GPUs of today's clusters.
        dtype, reason = (
            "bf16",
            "auto: no GPU is visible here, so bf16 is assumed (set fp16 for GPUs before Ampere)",
        )
    elif bf16:
        dtype, reason = "bf16", "auto: every visible GPU is Ampere or newer"
    else:
        dtype, reason = "fp16", "auto: a visible GPU predates Ampere (no bf16)"
    # bf16 has fp32's exponent range, so only fp16 gradients need a loss scale.
    scale = p.loss_scale if dtype == "fp16" else None
    return PrecisionPolicy(dtype, reason, p.allow_tf32, scale, bf16)


#: fp8 tensor cores arrived with Ada (8.9) and Hopper (9.0).
FP8_CAPABILITY = (8, 9)


def problems(policy: PrecisionPolicy, backend: str, device: str, hardware: Hardware) -> list[str]:
    """What the backend would reject at run time for this policy on this device."""
    out = []
    if device == "cpu" and policy.dtype == "fp16" and backend == "deepspeed":
        out.append(
            "precision.dtype: fp16 is not supported by DeepSpeed on CPU; "
            "use precision.dtype=bf16, or backend=accelerate (which scales fp16 on CPU)"
        )
    if device == "cuda" and policy.dtype == "fp8":
        old = [g for g in hardware.gpus if g.capability < FP8_CAPABILITY]
        if old:
            out.append(
                f"precision.dtype: fp8 matmuls need compute capability 8.9+ (Ada, Hopper): GPU {old[0].index} "
                f"({old[0].name}) is {old[0].capability[0]}.{old[0].capability[1]}; use precision.dtype=bf16"
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
    """DeepSpeed's `fp16` section: all six loss-scale knobs when fp16, else only `enabled: false`."""
    ls = policy.loss_scale
    if ls is None:
        return {"enabled": False}
    return {
        "enabled": True,
        # DeepSpeed reads loss_scale 0 as "dynamic"; any other value is a static scale.
        "loss_scale": 0 if ls.dynamic else ls.initial,
        "initial_scale_power": round(math.log2(ls.initial)),
        "loss_scale_window": ls.window,
        "hysteresis": ls.hysteresis,
        "consecutive_hysteresis": ls.consecutive_hysteresis,
        # DeepSpeed's min_loss_scale is an int field (the recipe rules make it whole).
        "min_loss_scale": int(ls.min) if ls.min == int(ls.min) else ls.min,
    }


def describe_row(p: PrecisionPolicy) -> str:
    """The dry run's precision row."""
    what = (
        "fp8 matmuls in the converted linear layers, bf16 elsewhere"
        if p.dtype == "fp8"
        else f"{p.dtype} compute"
    )
    row = f"{what}, {p.master_dtype} master weights ({p.reason})"
    if p.loss_scale is not None:
        ls = p.loss_scale
        kind = f"dynamic from {ls.initial:g}" if ls.dynamic else f"static {ls.initial:g}"
        row += f"; loss scale {kind}"
    return row
