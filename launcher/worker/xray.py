"""Precision x-ray: per layer, how close the gradients come to fp16's limits, and which updates vanish.

At step 1 and every `logging.precision_every` steps each rank measures its own shard of the
reduced gradients (FSDP2's DTensor shards, ZeRO's partitions; where the gradient is whole on every
rank, each rank takes an equal slice of every layer) and of its fp32 master weights, between the
last backward and the optimizer step; the counts of all ranks are gathered once. A "layer" is a
module: a parameter's name without its last part (`encoder.layer.0.attention.self.query` holds its
weight and bias).

Gradient columns, in units of the scaled gradient `x = g * loss_scale` (fp16 runs; the value fp16
holds or would hold): exactly zero; fp16 subnormal (0 < |x| < 2^-14: precision lost), of them
rounding to zero in fp16 (0 < |x| < 2^-25); near fp16's maximum (|x| >= 65504 / 16, four doublings
of the scale away); and the largest |x|. The unscaled gradient's norm, and at step 1 its sketch
(`sketch`), which `mplaunch parity` compares between the fp32 and the mixed run: same weights,
same batch. Update columns, on at most UPDATE_SAMPLE evenly spaced elements of each layer whose
gradient is not zero: the fp32 master weight did not change (`lost`: the update was below half
its fp32 ULP), and the weight as the forward sees it, rounded to the compute dtype, did not
change (`stale`: normal with fp32 master weights, which keep it).

launcher.analysis.health judges these records (light side); this module is the worker's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from launcher.worker.precision import DTYPES

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_TO_ZERO = 2.0**-25  # half the smallest subnormal (2^-24): round-to-nearest gives 0 below it
HEADROOM = 16.0  # "near the maximum" is within this factor of FP16_MAX
UPDATE_SAMPLE = 1 << 16  # elements per layer whose update is followed through the step
SKETCH = 8  # random projections of each layer's gradient, at step 1 (mplaunch parity compares them)
CHUNK = 1 << 24  # elements measured at once (bounds the temporary of |x|)

# Columns of the per-layer count matrix, summed over ranks; MAX_COLUMN is reduced by max.
GRAD = ("elements", "zero", "below_to_zero", "below_normal", "near_max")
UPDATE = ("sampled", "lost", "stale")
NORM = ("sumsq", "unsketched")  # of the unscaled gradient; elements of shards without an offset
COLUMNS = (*GRAD, *UPDATE, *NORM, *(f"sketch{k}" for k in range(SKETCH)), "max_abs")
_SUMSQ, _SKETCH = len(GRAD) + len(UPDATE), len(GRAD) + len(UPDATE) + len(NORM)
MAX_COLUMN = len(COLUMNS) - 1


@dataclass
class Shard:
    """One parameter's part held by this rank: its gradient and its fp32 master weight, both 1-D.

    `master` is None where the backend keeps no per-parameter view of it (no update columns);
    `offset` is where `grad` starts in the flattened parameter, None where unknown (no sketch).
    """

    layer: str
    grad: torch.Tensor
    master: torch.Tensor | None
    offset: int | None = 0


# Parts of parameter names that wrappers add: DDP's leading "module", torch.compile's, checkpointing's
# (FSDP2's fully_shard adds none).
_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")


def mode(step: int, every: int) -> str | None:
    """What the x-ray of optimizer step `step` (1-based) takes, at logging.precision_every `every`
    (0: never): "sketch" at step 1 (stats and sketch: the weights and batch `mplaunch parity`
    compares), "stats" every `every` steps, else None."""
    if not every:
        return None
    if step == 1:
        return "sketch"
    return "stats" if step % every == 0 else None


def layer_of(name: str) -> str:
    """The module a parameter belongs to: its name without wrapper parts and without its last part."""
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts[:-1]) or parts[-1]


def layers_of(named: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """The layers of the trainable parameters, in the model's order."""
    return list(dict.fromkeys(layer_of(n) for n, p in named if p.requires_grad))


def slice_start(numel: int, rank: int, world: int) -> int:
    """Where this rank's equal share of `numel` elements starts (see my_slice)."""
    return min(rank * -(-numel // world), numel)


def my_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of a tensor every rank holds whole (1-D view, no copy)."""
    flat = t.reshape(-1)
    start = slice_start(flat.numel(), rank, world)
    return flat.narrow(0, start, min(-(-flat.numel() // world), flat.numel() - start))


def sketch(g: torch.Tensor, offset: int) -> torch.Tensor:
    """SKETCH random projections of a parameter's gradient part starting at element `offset`.

    Each element's signs (+-1) come from a hash of its index in the parameter, so the parts of a
    sharded gradient sum, over ranks, to the sketch of the whole; two runs of the same model get
    the same signs. The distance between two gradients' sketches over the norm of one estimates
    their relative difference (to about 1 / sqrt(2 * SKETCH)) without gathering either.
    """
    out = torch.zeros(SKETCH, dtype=torch.float64, device=g.device)
    flat = g.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK].double()
        index = torch.arange(
            offset + start, offset + start + part.numel(), device=g.device, dtype=torch.int64
        )
        for k in range(SKETCH):
            h = (index * 2654435761 + (k + 1) * 40503) & 0xFFFFFFFF
            h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
            sign = 1.0 - 2.0 * ((h ^ (h >> 16)) & 1).double()
            out[k] += (part * sign).sum()
    return out


def grad_counts(grad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """GRAD counts, the largest |x| and the sum of x^2 of the scaled gradient `x = grad * scale`
    (float64, on grad's device), a CHUNK at a time: no full-size temporary."""
    out = torch.zeros(len(GRAD) + 2, dtype=torch.float64, device=grad.device)
    out[0] = grad.numel()
    for part in grad.detach().reshape(-1).split(CHUNK):
        a = part.abs().float() * scale if scale != 1 else part.abs().float()
        out[1:5] += torch.stack(
            [
                (a == 0).sum(),
                (a < FP16_TO_ZERO).sum(),
                (a < FP16_MIN_NORMAL).sum(),
                (a >= FP16_MAX / HEADROOM).sum(),
            ]
        ).double()
        if a.numel():
            out[5] = torch.maximum(out[5], a.max().double())
            out[6] += a.double().square().sum()
    out[2:4] -= out[1]  # the "below" counts leave out exact zeros
    return out


def _sample(t: torch.Tensor) -> torch.Tensor:
    stride = max(1, -(-t.numel() // UPDATE_SAMPLE))
    return t.reshape(-1)[::stride]


class Probe:
    """One x-ray step on one rank: built between the last backward and the optimizer step (it
    measures the gradients and keeps the sampled master weights), then `finish` after the step.

    Args:
        layers: every trainable layer's name, the same list on every rank (a rank may hold no part of some).
        shards: this rank's parts of the trainable parameters (see Shard).
        compute: the compute dtype name (fp16, bf16, fp32).
        loss_scale: the fp16 loss scale this step's backward used; None without one.
        held_scaled: the gradients are held multiplied by the loss scale (not yet unscaled).
        sketched: also take each layer's gradient sketch (see `sketch`).
    """

    def __init__(
        self,
        layers: list[str],
        shards: list[Shard],
        compute: str,
        loss_scale: float | None,
        held_scaled: bool,
        sketched: bool = False,
    ) -> None:
        self.loss_scale = loss_scale
        self.sketched = sketched
        # x = grad * scale is the scaled gradient; x / loss_scale the unscaled one.
        scale = 1.0 if loss_scale is None or held_scaled else loss_scale
        unscale = 1.0 / loss_scale if loss_scale is not None else 1.0
        self.layers = layers
        self.compute = DTYPES[compute]
        index = {name: i for i, name in enumerate(self.layers)}
        device = shards[0].grad.device if shards else torch.device("cpu")
        self.counts = torch.zeros(len(self.layers), len(COLUMNS), dtype=torch.float64, device=device)
        self.samples: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in shards:
            i = index[s.layer]
            c = grad_counts(s.grad, scale)
            self.counts[i, : len(GRAD)] += c[: len(GRAD)]
            self.counts[i, MAX_COLUMN] = torch.maximum(self.counts[i, MAX_COLUMN], c[len(GRAD)])
            self.counts[i, _SUMSQ] += c[len(GRAD) + 1] * unscale**2
            if sketched and s.offset is not None:
                self.counts[i, _SKETCH : _SKETCH + SKETCH] += sketch(s.grad, s.offset) * scale * unscale
            elif sketched:
                self.counts[i, _SUMSQ + 1] += s.grad.numel()
            if s.master is not None and s.master.numel():
                live = _sample(s.grad) != 0
                self.samples.append((i, s.master, live, _sample(s.master).clone()))

    def finish(self, stepped: bool, lr: float, world: int, group: Any = None) -> dict[str, Any]:
        """After the optimizer step: the x-ray record (without its step), the same on every rank.

        A collective: every rank calls it at the same step.

        Args:
            stepped: the optimizer step was taken (a skipped fp16 step moves no weight).
            lr: the learning rate the step used.
            world: ranks in the job.
        """
        self._after_step(stepped)
        return record(self.layers, self.gather(world, group), self.loss_scale, not stepped, lr, self.sketched)

    def _after_step(self, stepped: bool) -> None:
        """Compare the sampled master weights with their values before the step (not when it was skipped)."""
        if stepped:
            for i, master, live, before in self.samples:
                after = _sample(master)
                lost = (after == before) & live
                stale = (after.to(self.compute) == before.to(self.compute)) & live
                self.counts[i, len(GRAD) : _SUMSQ] += torch.stack(
                    [live.sum(), lost.sum(), stale.sum()]
                ).double()
        self.samples = []

    def gather(self, world: int, group: Any = None) -> torch.Tensor:
        """Every rank's counts combined (one all_gather); the same on every rank."""
        if world == 1:
            return self.counts.cpu()
        import torch.distributed as dist

        parts = [torch.empty_like(self.counts) for _ in range(world)]
        dist.all_gather(parts, self.counts, group=group)
        stacked = torch.stack(parts)
        total = stacked.sum(0)
        total[:, MAX_COLUMN] = stacked[:, :, MAX_COLUMN].max(0).values
        return total.cpu()


def record(
    layers: list[str],
    counts: torch.Tensor,
    loss_scale: float | None,
    skipped: bool,
    lr: float,
    sketched: bool = False,
) -> dict[str, Any]:
    """The metrics.jsonl record of one x-ray step, but its step: shares per layer (README, "Precision x-ray")."""
    rows: dict[str, dict[str, Any]] = {}
    for name, c in zip(layers, counts.tolist(), strict=True):
        col = dict(zip(COLUMNS, c, strict=True))
        n, nonzero, sampled = col["elements"], col["elements"] - col["zero"], col["sampled"]
        row: dict[str, Any] = {"elements": int(n), "zero": _share(col["zero"], n)}
        if loss_scale is not None:  # fp16: where the scaled gradients sit in fp16's range
            row["underflow"] = _share(col["below_normal"], nonzero)
            row["to_zero"] = _share(col["below_to_zero"], nonzero)
            row["near_max"] = _share(col["near_max"], n)
            peak = col["max_abs"]
            row["headroom_log2"] = round(_log2(FP16_MAX / peak), 2) if 0 < peak < float("inf") else None
        row["lost"] = _share(col["lost"], sampled)
        row["stale"] = _share(col["stale"], sampled)
        row["grad_norm"] = _finite(math.sqrt(col["sumsq"]))
        projections = [_finite(c[_SKETCH + k]) for k in range(SKETCH)]
        if sketched and not col["unsketched"] and n and None not in projections:
            row["sketch"] = projections
        rows[name] = row
    return {"kind": "precision", "loss_scale": loss_scale, "skipped": skipped, "lr": lr, "layers": rows}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole > 0 else None


def _log2(x: float) -> float:
    return math.log2(x)
