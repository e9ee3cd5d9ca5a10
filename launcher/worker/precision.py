"""The worker's precision: the plan's resolved policy (launcher.plan.precision) in torch terms.

`DTYPES` is the one map from mplaunch's dtype names (launcher.plan.precision.DTYPE_BYTES) to
torch dtypes; every worker module reads it. fp8 is not one of them: its linear layers are
converted (launcher.worker.fp8) and everything else computes in the policy's `compute_dtype`, bf16. `Precision` owns, for one rank, what Lightning
Fabric's precision plugin owns: the autocast context, the fp16 loss scaler with its checkpoint
state, and (`set_tf32`) whether fp32 matrix products may use TF32. It reads the policy and never
re-decides it. The Accelerate backend drives it, at zero.stage 0 (DDP) and 1-3 (FSDP2, whose
16-bit parameter gathering comes beside autocast, not instead of it:
launcher.worker.backends.fsdp2); DeepSpeed scales the loss inside its engine
(from the plan's DeepSpeed config), so its backend builds none.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from launcher.plan.loss_scale import DynamicScale
from launcher.plan.precision import DTYPE_BYTES, PrecisionPolicy

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert DTYPES.keys() == DTYPE_BYTES.keys()
assert all(DTYPES[name].itemsize == width for name, width in DTYPE_BYTES.items())


def set_tf32(policy: PrecisionPolicy) -> None:
    """Let CUDA's fp32 matrix products and convolutions use TF32 exactly when the policy allows it."""
    torch.backends.cuda.matmul.allow_tf32 = policy.allow_tf32
    torch.backends.cudnn.allow_tf32 = policy.allow_tf32


class Precision:
    """Autocast and the fp16 loss scaler of one rank, as the policy says.

    Args:
        policy: the plan's precision (plan.precision).
        device_type: where compute runs ("cpu" or "cuda").
        sharded: the gradients are FSDP2's DTensor shards (zero.stage 1-3 on Accelerate): torch's
            ShardedGradScaler underneath unscales each rank's shards and all-reduces the overflow
            flag, so every rank skips the same steps and lowers the scale alike (a plain
            GradScaler would only see this rank's shards).
    """

    def __init__(self, policy: PrecisionPolicy, device_type: str, sharded: bool = False) -> None:
        self.policy = policy
        self.device_type = device_type
        # fp32 runs without autocast: the parameters, fp32 master weights, are used as they are.
        # fp8 autocasts to bf16: only its converted linear layers multiply in fp8 (launcher.worker.fp8).
        self.autocast_dtype = DTYPES[policy.compute_dtype] if policy.autocast else None
        self.scaler: Any = None
        if policy.loss_scale is not None:
            rule = DynamicScale.from_recipe(policy.loss_scale)
            self.scaler = _scaler_class(sharded)(device_type, rule)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward pass runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the loss scale in fp16, else as it is."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (before clipping and the x-ray)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """The optimizer step, unless fp16 gradients overflowed; then update the loss scale.

        Returns:
            whether the scaler skipped the step; None without a scaler (not fp16), where nothing
            checks the gradients: a non-finite step is left for the Meter's checks to stop the run.

        Raises:
            launcher.plan.loss_scale.ScaleAtMinimum: an overflow at the minimum loss scale.
        """
        if self.scaler is None:
            optimizer.step()
            return None
        self.scaler.step(optimizer)
        self.scaler.update()
        return bool(self.scaler.last_overflow)

    def loss_scale(self) -> float | None:
        """The current loss scale; None without one."""
        return self.scaler.rule.scale if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state for a checkpoint (DynamicScale's fields); None without a scaler."""
        return self.scaler.rule.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's `state_dict()` (nothing to do without a scaler or a state)."""
        if self.scaler is None or state is None:
            return
        self.scaler.rule = DynamicScale(**state)
        self.scaler._scale = None  # re-created at the rule's scale on first use
        self.scaler._init_scale = self.scaler.rule.scale


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
