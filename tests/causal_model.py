"""A user's causal LM (reached through `model.target`) that insists on causal-LM batches.

It predicts token t+1 from token t and refuses any batch whose labels are not its
inputs, which is what a masked-LM batch would give it.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalLM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not torch.equal(input_ids, labels):
            raise ValueError("CausalLM got a batch whose labels are not its inputs (masked-LM batches?)")
        logits = self.head(self.embed(input_ids))[:, :-1]
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
        )


def build(vocab_size: int = 512, hidden: int = 32) -> nn.Module:
    return CausalLM(vocab_size, hidden)
