"""A user model (reached through `model.target`) whose loss spikes on chosen steps.

Multiplying the loss by a huge factor makes the fp16 gradients overflow on
exactly those steps, which is how the tests inject overflows into a real run.
"""

from __future__ import annotations

import torch
from torch import nn


class Spiky(nn.Module):
    def __init__(
        self, vocab_size: int, hidden: int, spike_steps: list[int], accum: int, spike: float
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.head = nn.Linear(hidden, vocab_size)
        self.spike_steps = set(spike_steps)
        self.accum = accum
        self.spike = spike
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step = self.calls // self.accum + 1  # the optimizer step this micro-batch belongs to (1-based)
        if self.training:
            self.calls += 1
        h = self.embed(input_ids)
        logits = self.head(h + self.mlp(h))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        if self.training and (step in self.spike_steps or -1 in self.spike_steps):
            loss = loss * self.spike
        return loss


def build(
    vocab_size: int = 512, hidden: int = 32, spike_steps: list[int] = (), accum: int = 1, spike: float = 1e8
) -> nn.Module:
    """`spike_steps` lists 1-based optimizer steps to overflow; [-1] overflows every step."""
    return Spiky(vocab_size, hidden, list(spike_steps), accum, spike)
