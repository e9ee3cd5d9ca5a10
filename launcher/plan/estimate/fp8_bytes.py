"""What precision.dtype fp8 adds to (and, with fp8 all-gather, takes from) a rank's memory.

torchao's Float8Linear keeps its bf16 input and fp32 master weight for backward and casts them to
fp8 again there, so its fp8 copies are transient, one layer at a time: the weight cast (1 byte an
element) and its transposed copy for the input gradient, the input cast in forward and the output
gradient cast (e5m2) in backward, 1 byte an element each, and their scales (one fp32 per tensor
tensorwise, one per row rowwise). With FSDP2's fp8 all-gather (tensorwise, zero.stage >= 1 under
accelerate, on GPUs) the converted weights are gathered in fp8 rather than bf16: 1 byte an element
less for each one held unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.plan import fp8, hf_dir

if TYPE_CHECKING:
    from launcher.plan.resolve import Plan


@dataclass(frozen=True)
class Fp8Weights:
    """The converted linear layers as the memory planner needs them."""

    converted: int  # elements of every converted weight
    largest: tuple[int, int]  # (in_features, out_features) of the largest converted layer
    rowwise: bool
    all_gather: bool

    def cast_bytes(self, tokens: int) -> int:
        """The most the fp8 casts of one layer hold at once, for `tokens` tokens per micro-batch."""
        fan_in, fan_out = self.largest
        casts = 2 * fan_in * fan_out + tokens * (fan_in + fan_out)
        scales = 4 * (tokens + fan_out + fan_in) if self.rowwise else 4 * 3
        return casts + scales


def of(plan: Plan) -> Fp8Weights | None:
    """The plan's converted layers' sizes; None without fp8 or when the plan does not know them."""
    f = plan.precision.fp8
    if f is None or f["converted"] is None:
        return None
    hf = hf_dir.read(plan.hf_dir, "", dict(plan.recipe.model.config))[0] if plan.hf_dir else None
    m = plan.model
    layers = fp8.layers_of(plan.recipe, hf, m.task, m.num_labels, plan.vocab_size) or []
    names = set(f["converted"])
    sizes = [(a, b) for name, a, b in layers if name in names]
    if not sizes:
        return None
    largest = max(sizes, key=lambda s: s[0] * s[1])
    return Fp8Weights(sum(a * b for a, b in sizes), largest, f["scaling"] == "rowwise", f["all_gather"])
