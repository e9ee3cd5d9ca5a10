"""A user model (reached through `model.target`) whose backward gives NaN gradients on chosen steps.

It is tests/spiky_model.py's model without spikes: the forward pass and the loss
stay finite on every step; only the gradient flowing back from the loss is NaN on
the chosen steps, which is how the tests make a step whose loss looks healthy but
whose update would poison the weights.
"""

from __future__ import annotations

import torch
from spiky_model import Spiky  # tests/ is on the path, as for every model.target here
from torch import nn


class _NanBackward(torch.autograd.Function):
    """The identity going forward; NaN gradients going back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(grad, float("nan"))


class NanGrads(Spiky):
    def __init__(self, vocab_size: int, hidden: int, nan_steps: list[int], accum: int) -> None:
        super().__init__(vocab_size, hidden, spike_steps=[], accum=accum, spike=1.0)
        self.nan_steps = set(nan_steps)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step = self.calls // self.accum + 1  # the optimizer step this micro-batch belongs to (1-based)
        loss = super().forward(input_ids, labels)
        if self.training and (step in self.nan_steps or -1 in self.nan_steps):
            loss = _NanBackward.apply(loss)
        return loss


def build(vocab_size: int = 512, hidden: int = 32, nan_steps: list[int] = (), accum: int = 1) -> nn.Module:
    """`nan_steps` lists 1-based optimizer steps whose gradients are NaN; [-1] every step."""
    return NanGrads(vocab_size, hidden, list(nan_steps), accum)
