"""A user model (reached through `model.target`) whose weights turn NaN on a chosen step while
its loss and gradients stay finite.

On the last micro-batch of `poison_step` the forward pass, after computing a
finite loss, overwrites one parameter with NaN. That parameter enters the loss
only as `0 * sum`, so its gradient is 0 and the step's loss and gradient norm
look healthy; only the parameters themselves show that the step is not fit to
save. Meant for backends whose parameters are the optimizer's own (Accelerate's DDP, zero.stage 0):
DeepSpeed's separate fp32 master copy, and FSDP2's fp32 shards behind the gathered parameters,
would overwrite the NaN at the step.
"""

from __future__ import annotations

import torch
from torch import nn


class Poisoned(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, poison_step: int, accum: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)
        self.poison = nn.Parameter(torch.zeros(hidden))
        self.poison_step = poison_step
        self.accum = accum
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step = self.calls // self.accum + 1  # the optimizer step this micro-batch belongs to (1-based)
        last_micro = self.calls % self.accum == self.accum - 1
        if self.training:
            self.calls += 1
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss = loss + 0.0 * self.poison.sum()  # a zero gradient, so every rank's DDP reduction sees it
        if self.training and step == self.poison_step and last_micro:
            with torch.no_grad():
                self.poison.fill_(float("nan"))
        return loss


def build(vocab_size: int = 512, hidden: int = 32, poison_step: int = 1, accum: int = 1) -> nn.Module:
    """`poison_step`: the 1-based optimizer step after which the weights hold NaN."""
    return Poisoned(vocab_size, hidden, poison_step, accum)
