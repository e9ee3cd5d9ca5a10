"""Dynamic loss scaling with DeepSpeed's rules, as plain Python (no torch).

DeepSpeed's scaler runs inside DeepSpeed; this one drives torch's GradScaler
under Accelerate, so that the same `precision.loss_scale` fields mean the
same thing on both backends: halve after `hysteresis` overflows, double
after `window` clean steps, never go below `min`, and stop when an overflow
happens at the minimum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from launcher.recipe.schema import LossScale


class ScaleAtMinimum(Exception):
    """An overflow at the minimum loss scale: fp16 cannot represent this run's gradients."""


@dataclass
class DynamicScale:
    """The scaler's state; `update(overflow)` after every optimizer step."""

    scale: float
    window: int
    min_scale: float
    hysteresis: int
    consecutive_hysteresis: bool
    dynamic: bool = True
    iteration: int = 0
    last_overflow_iteration: int = -1
    hysteresis_left: int = 0

    def __post_init__(self) -> None:
        if self.hysteresis_left == 0:
            self.hysteresis_left = self.hysteresis

    def update(self, overflow: bool) -> None:
        """Advance one optimizer step.

        Raises:
            ScaleAtMinimum: the step overflowed with the scale already at its minimum.
        """
        if not self.dynamic:
            self.iteration += 1
            return
        if overflow:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale == self.min_scale:
                    raise ScaleAtMinimum(f"gradients overflow at the minimum loss scale {self.min_scale:g}")
                self.scale = max(self.scale / 2.0, self.min_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            clean_steps = self.iteration - self.last_overflow_iteration - 1
            if clean_steps > 0 and clean_steps % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.hysteresis_left = self.hysteresis
                self.scale *= 2.0
        self.iteration += 1

    def state_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_recipe(cls, ls: LossScale) -> DynamicScale:
        """From the policy's loss-scale settings (`precision.loss_scale`, in the recipe's names)."""
        return cls(
            scale=ls.initial,
            window=ls.window,
            min_scale=ls.min,
            hysteresis=ls.hysteresis,
            consecutive_hysteresis=ls.consecutive_hysteresis,
            dynamic=ls.dynamic,
        )
