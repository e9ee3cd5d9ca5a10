"""The batch triple: global_batch_size = micro_batch_size x grad_accum x world_size.

The recipe sets any two of the three (or micro_batch_size alone, with grad_accum 1);
`resolve_batch` derives the third for the planned world size, or says why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.recipe.schema import Recipe


@dataclass(frozen=True)
class Batch:
    """The batch triple; global = micro x grad_accum x world (data-parallel)."""

    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    world_size: int

    def equation(self, nnodes: int, nproc_per_node: int) -> str:
        node_word = "node" if nnodes == 1 else "nodes"
        proc_word = "proc" if nproc_per_node == 1 else "procs"
        return (
            f"global_batch_size {self.global_batch_size} = micro_batch_size {self.micro_batch_size}"
            f" x grad_accum {self.grad_accum} x world_size {self.world_size}"
            f" ({nnodes} {node_word} x {nproc_per_node} {proc_word})"
        )


def resolve_batch(recipe: Recipe, world: int, problems: list[str]) -> Batch | None:
    """Derive the batch triple from any two of its members (or one, with grad_accum 1)."""
    t = recipe.train
    m, g, a = t.micro_batch_size, t.global_batch_size, t.grad_accum
    if m is None and g is None:
        problems.append("train.micro_batch_size: set it (or train.global_batch_size) to size the batch")
        return None
    if m is not None and g is not None and a is not None:
        if g != m * a * world:
            problems.append(
                f"train.global_batch_size: {g} != micro_batch_size {m} x grad_accum {a} x world_size {world}"
                f" (= {m * a * world}); set only two of the three"
            )
            return None
    elif m is not None and g is not None:
        if g % (m * world):
            problems.append(
                f"train.global_batch_size: {g} is not divisible by micro_batch_size {m} x world_size {world}"
                f" (= {m * world})"
            )
            return None
        a = g // (m * world)
    elif m is not None:
        a = a or 1
        g = m * a * world
    else:
        assert g is not None
        a = a or 1
        if g % (a * world):
            problems.append(
                f"train.global_batch_size: {g} is not divisible by grad_accum {a} x world_size {world} (= {a * world})"
            )
            return None
        m = g // (a * world)
    return Batch(m, a, g, world)
