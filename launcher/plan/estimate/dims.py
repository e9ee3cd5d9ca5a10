"""The first dimension of each parameter tensor of a built-in model: what FSDP2 shards on.

`fully_shard` splits every parameter on dim 0 as torch.chunk does, so a rank's share of a tensor
depends on its row count, not only on its size (launcher.plan.estimate.state_bytes, `Params.shard`).
The families record their tensors as (name, numel) (launcher.recipe.tensors); the rows follow from
the names and the linear layers (launcher.recipe.shapes.linear_layers). tests/worker/test_memory_fsdp2.py
holds them equal to the built models' `p.shape[0]`.
"""

from __future__ import annotations

from launcher.plan.estimate import flops
from launcher.recipe.families import FAMILIES
from launcher.recipe.shapes import Shape, linear_layers


def param_dim0(shape: Shape) -> tuple[int, ...] | None:
    """dim-0 size of each parameter, in `flops.param_tensors` order; None for a family without a layer list.

    nn.Linear stores its weight (out, in); transformers' Conv1D (GPT-2's blocks) (in, out).
    A weight of no linear layer is an embedding (rows x hidden) or, of `hidden` elements, a norm's
    (one dimension); a bias has one dimension.
    """
    tensors, layers = flops.param_tensors(shape), linear_layers(shape)
    if tensors is None or layers is None:
        return None
    family = FAMILIES[shape.family]
    conv1d = family.transformer and not family.head_transform  # GPT-2, as linear_layers tells them apart
    linear = {
        name: fan_in if conv1d and name.startswith(family.layer_prefix) else fan_out
        for name, fan_in, fan_out in layers
    }
    h, out = shape.hidden_size, []
    for name, numel in tensors:
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in linear:
            out.append(linear[module])
        elif kind == "weight" and numel != h:
            out.append(numel // h)
        else:
            out.append(numel)
    return tuple(out)


def chunk0(numel: int, rows: int, world: int) -> int:
    """Elements of the first rank's piece of a tensor split on dim 0 into `world` (torch.chunk: ceil(rows / world) rows)."""
    return -(-rows // world) * (numel // rows) if rows else 0
