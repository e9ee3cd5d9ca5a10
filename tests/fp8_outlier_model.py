"""A user model (reached through `model.target`) with one layer that fp8 cannot serve: an outlier.

`block.mid` reads the hidden states plus one extra row, a "sink" whose first feature is `outlier`
(1e6 by default) and whose output is dropped. In fp32 or bf16 the sink changes nothing: each row of
a matrix product is computed alone, and the dropped row gets no gradient. In fp8 with tensorwise
scaling the sink sets the input's one scale (448 / 1e6), and every ordinary element below about
2 rounds to zero: the layer reads almost nothing, the run trains worse than bf16, and the fp8 x-ray
reports the layer's input underflowing. Rowwise scaling, or keeping the layer in bf16
(precision.fp8.keep=[block.mid]), serves it.

A causal LM without attention (each token predicts the next from itself: a bigram model), so
it learns from text quickly; labels are the input ids, shifted here as transformers' models do.
The layers sit in submodules so that precision.fp8.keep_first_last keeps `inlet.0` (the first
module's linear layers) and `head` (the last), and converts `block.mid` and `block.out`.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, outlier: float) -> None:
        super().__init__()
        self.mid = nn.Linear(hidden, 4 * hidden)
        self.out = nn.Linear(4 * hidden, hidden)
        self.outlier = outlier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sink = torch.zeros_like(h[:, :1])
        sink[..., 0] = self.outlier
        m = nn.functional.gelu(self.mid(torch.cat([h, sink], dim=1)))[:, :-1]
        return h + self.out(m)


class Outlier(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, outlier: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.inlet = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.block = Block(hidden, outlier)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Each token predicts the next.
        logits = self.head(self.block(self.inlet(self.embed(input_ids))))[:, :-1]
        targets = labels[:, 1:]
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def build(vocab_size: int = 512, hidden: int = 64, outlier: float = 1e6) -> nn.Module:
    """`outlier`: the sink row's first feature (0: no outlier, a healthy model)."""
    return Outlier(vocab_size, hidden, outlier)
