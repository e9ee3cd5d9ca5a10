"""A user model (reached through `model.target`) that hangs or fails in forward on one rank at a chosen step.

The rank is read from the RANK variable torchrun sets; steps are 1-based optimizer steps.
"""

from __future__ import annotations

import errno
import os
import time

import torch
from torch import nn


class Faulty(nn.Module):
    def __init__(
        self, vocab_size: int, hidden: int, rank: int, step: int, accum: int, fault: str, seconds: float
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)
        self.fault_here = int(os.environ.get("RANK", "0")) == rank
        self.step, self.accum, self.fault, self.seconds = step, accum, fault, seconds
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step = self.calls // self.accum + 1
        if self.training:
            self.calls += 1
        if self.training and self.fault_here and self.fault == "sleep" and step >= self.step:
            time.sleep(self.seconds)  # a slow rank: every micro-batch from `step` on
        elif self.training and self.fault_here and step == self.step:
            if self.fault == "leave":  # the peers see the connection close, then this rank fails
                torch.distributed.destroy_process_group()
                time.sleep(3)
                raise RuntimeError(f"rank {os.environ.get('RANK')}'s own error")
            if self.fault == "hang":
                while True:  # stuck in forward: no error, no progress
                    time.sleep(1)
            if self.fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/shard-7.bin")
            raise RuntimeError(self.fault)
        logits = self.head(self.embed(input_ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def build(
    vocab_size: int = 512,
    hidden: int = 32,
    rank: int = 1,
    step: int = 3,
    accum: int = 1,
    fault: str = "hang",
    seconds: float = 0.1,
) -> nn.Module:
    """`fault` on `rank` at optimizer step `step`: "hang" sleeps forever; "sleep" takes `seconds`
    more per micro-batch from then on; "leave" leaves the process group, then raises;
    "enospc" raises a full disk's OSError; anything else is raised as a RuntimeError."""
    return Faulty(vocab_size, hidden, rank, step, accum, fault, seconds)
