"""Bytes one rank holds, by category, for a model under a backend and ZeRO stage: the formulas.

Model state (Psi parameters, N data-parallel ranks, Adam) follows the ZeRO paper
for mixed precision, 16 bytes per parameter: 2 (16-bit params) + 2 (16-bit grads)
+ 4 (fp32 master) + 8 (two fp32 moments). Stage 1 keeps 4Psi + 12Psi/N, stage 2
2Psi + 14Psi/N, stage 3 16Psi/N. Where DeepSpeed 0.19 (read from its source:
runtime/zero/stage_1_and_2.py, stage3.py, fp16/unfused_optimizer.py) differs:

* fp32 runs: params and grads are 4 bytes. Stages 1-2 still clone an fp32
  master partition (4Psi/N); stage 0 (plain torch AdamW) has none, stage 3 clones it.
* stage 1 reduces gradients only at the accumulation boundary: with grad_accum
  > 1 it keeps every 16-bit gradient between micro-batches (the paper's 2Psi),
  and at the boundary releases them as it reduces them into its partition, so the
  two do not add up (measured: the most any micro-batch's backward leaves is 2Psi);
  at grad_accum 1 it keeps only its reduced partition (2Psi/N), as stage 2 does.
* stage 3 keeps parameters of <= 1e5 elements (stage3_param_persistence_threshold,
  default) whole on every rank, besides their partition: biases and LayerNorms.
* comm buffers, live during backward: stages 1-2 allocate the reduce bucket at
  its full configured size, reduce_bucket_size = 5e8 elements in the model dtype
  (1 GB in bf16), twice with overlap_comm (on for CUDA in our config); stage 3
  one bucket, plus the gathered non-persistent parameters (prefetch bucket 5e7
  elements + the largest tensor, at most all of them); stage 0 flattens grads
  into min(Psi, 5e8)-element all-reduce chunks when N > 1. allgather_bucket_size
  is not modelled: stage 1-2 all-gather in place into the flat 16-bit params.
* step temporaries, after activations are freed: the fp32 copy of this rank's
  gradient partition (4Psi/N; 4Psi at stage 0 mixed), none for fp32.
* offload_optimizer moves master, moments and the fp32 grad partition to the
  host, plus a 16-bit staging copy of the partition and a largest-tensor grad
  buffer (also on the device); stage-2/3 gradients then go straight there.
  offload_params moves stage 3's partitions, except those of persistent params.

Accelerate trains fp32 parameters: 4 (params) + 4 (grads) + 8 (moments), no separate master.
Stage 0 is DDP (N > 1 adds its gradient buckets, 4Psi, gradient_as_bucket_view off). Stages 1-3
are FSDP2, on CPU (gloo) as on CUDA: mplaunch applies torch's `fully_shard` to every transformer
block, then to the root (embeddings, head, everything outside the blocks), each a unit:
* every parameter is a DTensor sharded on dim 0 over the N ranks, in fp32 (the master weights):
  rank r holds torch.chunk's r-th piece, ceil(rows / N) rows, fewer on the last ranks; FSDP2 pads
  each rank's storage to the first rank's piece, which is what `Params.shard` counts. Gradients
  are reduce-scattered into fp32 shards of the same size (reduce_dtype fp32) on a step's last
  micro-batch; Adam's moments are fp32 shards, plus its 4-byte `step` per parameter tensor.
* with grad_accum > 1 the earlier micro-batches skip the reduce-scatter
  (set_requires_gradient_sync(False)): every rank accumulates whole fp32 gradients of the trained
  parameters (FSDP2 upcasts them to reduce_dtype; measured: 4Psi on each of 2 CPU ranks), live
  from the first micro-batch's backward until the last one's reduce-scatter.
* stage 3 (reshard_after_forward=True) all-gathers a block for its forward and again for its
  backward, in the compute dtype (MixedPrecisionPolicy param_dtype; fp32 without one), and frees
  it after: the root's unsharded parameters stay for the whole forward and backward, the blocks
  come and go about two at a time (the current one and the prefetched next one). Stage 2
  (reshard_after_forward=False) keeps every block's unsharded copy from its forward to its
  backward, so at the start of backward all of them are live; stage 1 runs as stage 2 (FSDP2 has
  no optimizer-only sharding). Either way each unit's backward leaves its unsharded
  compute-dtype gradients, copied into an fp32 reduce-scatter input of the unit's size, before
  the reduce-scatter shards them: these two are the `comm_buffers` of FSDP2 (live during forward
  and backward), with the unsharded parameters and the accumulated gradients. All-gather staging
  buffers are not modelled apart: the second block stands in for them.
* zero.offload_params (CPUOffloadPolicy) keeps the shards, their gradients and Adam's state on
  the host; the unsharded copies are still made on the device.

LoRA (model.lora): `model` is then the adapters, the only parameters with gradients, masters and
Adam state, and `frozen` the base weights, held once, in the compute dtype where the backend casts
the module (DeepSpeed) and in fp32 where it keeps fp32 parameters (Accelerate). ZeRO-3 partitions
frozen weights as any others (and gathers them for compute); DDP buckets only trainable gradients;
FSDP2 shards frozen weights as DTensors like the others and all-gathers them with their unit, but
reduce-scatters gradients only for the parameters that have them (no flat gradient spans the
frozen ones). `lora_params` counts the adapters `launcher.worker.lora.apply` adds to a
built-in model: rank * (in + out) per adapted linear layer.

Activations are launcher.plan.estimate.activations'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from launcher.plan.estimate import flops
from launcher.plan.estimate.dims import chunk0, param_dim0
from launcher.plan.precision import DTYPE_BYTES as _BYTES
from launcher.recipe.families import FAMILIES
from launcher.recipe.shapes import Shape, linear_layers

# DeepSpeed's zero_optimization defaults, which our generated config leaves alone.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
PERSISTENCE_THRESHOLD = 100_000
ALLREDUCE_CHUNK = 500_000_000


@dataclass(frozen=True)
class Params:
    """What the model-state formulas need to know about a model's parameters."""

    total: int
    tensors: tuple[int, ...] = ()  # numel per tensor when known: stage-3 padding and persistence
    layer: int = 0  # one transformer block, an FSDP2 unit under per-block wrapping (0: unknown)
    num_layers: int = 0
    dim0: tuple[int, ...] = ()  # each tensor's first dimension, when known: FSDP2's shards

    @classmethod
    def of(cls, model: Shape | int) -> Params:
        if isinstance(model, int):
            return cls(model)
        tensors = flops.param_tensors(model)
        assert tensors is not None, f"no parameter hook for {model.family}"
        numels, dim0 = tuple(n for _, n in tensors), param_dim0(model) or ()
        if not FAMILIES[model.family].transformer:
            return cls(sum(numels), numels, dim0=dim0)
        return cls(sum(numels), numels, flops.layer_param_count(model), model.num_layers, dim0)

    def persistent(self) -> int:
        """Elements stage 3 keeps whole on every rank (tensors within the persistence threshold)."""
        return sum(n for n in self.tensors if n <= PERSISTENCE_THRESHOLD)

    def partition(self, world: int) -> int:
        """Elements of this rank's stage-3 partition: each tensor padded to a multiple of world."""
        return sum(-(-n // world) for n in self.tensors) if self.tensors else -(-self.total // world)

    def shard(self, world: int) -> int:
        """Elements of the first rank's FSDP2 shards, the most any rank holds: each tensor split on
        dim 0 as torch.chunk splits it (the partition's arithmetic where the rows are unknown)."""
        if not self.dim0:
            return self.partition(world)
        return sum(chunk0(n, rows, world) for n, rows in zip(self.tensors, self.dim0, strict=True))

    def plus(self, other: Params) -> Params:
        """Both sets of parameters together (tensor sizes kept where both are known, or one is empty)."""
        known = (bool(self.tensors) or not self.total) and (bool(other.tensors) or not other.total)
        rows = (bool(self.dim0) or not self.total) and (bool(other.dim0) or not other.total)
        return Params(
            self.total + other.total,
            self.tensors + other.tensors if known else (),
            self.layer + other.layer,
            max(self.num_layers, other.num_layers),
            self.dim0 + other.dim0 if known and rows else (),
        )


# peft's default LoRA targets of the built-in families that have a model type (launcher.recipe.families);
# tiny-mlp has none: every linear layer but the vocabulary head (launcher.worker.lora).
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    name: family.peft_targets for name, family in FAMILIES.items() if family.peft_targets
}


def lora_layers(shape: Shape, target_modules: Sequence[str] = ()) -> list[tuple[str, int, int]] | None:
    """(name, in, out) of the linear layers `launcher.worker.lora.apply` adapts; None for an unknown family.

    Args:
        shape: a built-in model's shape.
        target_modules: model.lora.target_modules, name suffixes as peft matches them; empty: the default.
    """
    layers = linear_layers(shape)
    if layers is None:
        return None
    targets = tuple(target_modules) or PEFT_DEFAULT_TARGETS.get(shape.family, ())
    if not targets:
        return [layer for layer in layers if layer[2] != shape.vocab_size]
    return [layer for layer in layers if any(layer[0] == t or layer[0].endswith("." + t) for t in targets)]


def lora_unmatched(shape: Shape, target_modules: Sequence[str]) -> list[str]:
    """The target modules that match no linear layer of a built-in model (`lora.apply` refuses them)."""
    layers = linear_layers(shape) or []
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n, _, _ in layers)]


def lora_params(shape: Shape, rank: int, target_modules: Sequence[str] = ()) -> Params | None:
    """The adapter parameters LoRA adds to a built-in model: A (rank x in) and B (out x rank) per layer.

    None for a family without a layer list; no tensors (total 0) when no layer matches.
    """
    layers = lora_layers(shape, target_modules)
    if layers is None:
        return None
    tensors = tuple(n for _, fan_in, fan_out in layers for n in (rank * fan_in, fan_out * rank))
    dim0 = tuple(rows for _, _, fan_out in layers for rows in (rank, fan_out))
    blocks = tuple(f.layer_prefix for f in FAMILIES.values() if f.layer_prefix)
    in_blocks = sum(rank * (i + o) for name, i, o in layers if name.startswith(blocks))
    num_layers = shape.num_layers if in_blocks else 0
    return Params(sum(tensors), tensors, in_blocks // num_layers if num_layers else 0, num_layers, dim0)


@dataclass(frozen=True)
class LoraSetting:
    """model.lora as the planner needs it: the adapters' count, and what shapes their activations."""

    rank: int
    dropout: float
    params: Params  # the adapters: the parameters that train
    target_modules: tuple[str, ...] = ()  # empty: the default (lora_layers)


@dataclass(frozen=True)
class ModelState:
    """Bytes one rank holds on its GPU per category, and in host memory (`cpu`) under offload."""

    params: int = 0
    grads: int = 0
    master: int = 0
    optimizer: int = 0
    comm_buffers: int = 0  # live during backward only
    step_buffers: int = 0  # live during the optimizer step only
    cpu: int = 0

    @property
    def device_state(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def model_state_bytes(
    model: Shape | int | Params,
    dtype: str,
    backend: str,
    stage: int,
    world_size: int,
    *,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    overlap_comm: bool = True,
    grad_accum: int = 1,
    frozen: Params | None = None,
) -> ModelState:
    """Model-state bytes per rank for Adam(W), by category.

    What each row counts, as a measurement would sum numel * element_size after
    a micro-batch's backward (the most over the step's micro-batches), before the step:
      params     DeepSpeed stages 0-2: every p in model.parameters(). Stage 3: every
                 p.ds_tensor, plus p.data of the persistent ones (p.ds_persist).
                 Accelerate: the fp32 parameters (FSDP2: the local tensors of this rank's
                 DTensor shards; the first rank's, padded, are the most).
      grads      DeepSpeed stage 0: every p.grad. Stages 1-2: optimizer.averaged_gradients
                 (stage 1 with grad_accum > 1: every p.grad, kept between micro-batches).
                 Stage 3: optimizer.grad_partitions_flat_buffer. Accelerate: p.grad (fp32;
                 FSDP2: the local shards, after the last micro-batch's reduce-scatter).
      master     Stage 0 mixed: optimizer.fp32_groups. Stages 1-2:
                 optimizer.single_partition_of_fp32_groups. Stage 3 mixed:
                 optimizer.fp32_partitioned_groups_flat (a clone of the partition, fp32 too).
      optimizer  exp_avg and exp_avg_sq in the torch optimizer's state (Accelerate: and
                 Adam's 4-byte `step` per tensor, where the tensors are known).
    With offload the same tensors exist, on the host: the rows then show device bytes
    only and `cpu` the host side plus its staging buffers, so compare a measurement
    with the offload=False numbers. Accelerate's stages 1-3 are FSDP2 on every device.

    Args:
        model: a built-in shape, a parameter count, or a Params.
        dtype: compute dtype: fp32, bf16 or fp16.
        backend: deepspeed or accelerate.
        stage: ZeRO stage 0-3.
        world_size: data-parallel ranks.
        offload_optimizer: ZeRO-Offload of the optimizer state (stage >= 1).
        offload_params: stage-3 parameter offload (accelerate: FSDP2's CPUOffloadPolicy).
        overlap_comm: DeepSpeed's zero_optimization.overlap_comm (ours: on for CUDA).
        grad_accum: micro-batches per optimizer step.
        frozen: parameters that do not train (LoRA's base weights); `model` is then the ones that do.
    """
    p = model if isinstance(model, Params) else Params.of(model)
    f = frozen or Params(0)
    if backend == "accelerate":
        return _accelerate_state(p, f, dtype, stage, world_size, offload_params, grad_accum)
    if stage == 0:
        w, psi, mixed = _BYTES[dtype], p.total, dtype != "fp32"
        # DeepSpeed's unfused fp16/bf16 optimizer: fp32 master copies, fp32 grads made at the step.
        chunk = w * min(psi, ALLREDUCE_CHUNK) if world_size > 1 else 0
        return ModelState(w * (psi + f.total), w * psi, 4 * psi * mixed, 8 * psi, chunk, 4 * psi * mixed)
    if stage < 3:
        state = _zero12_state(p, dtype, stage, world_size, offload_optimizer, overlap_comm, grad_accum)
        # Frozen weights stay whole on every rank, cast like the rest; the optimizer never sees them.
        return replace(state, params=state.params + _BYTES[dtype] * f.total)
    return _zero3_state(p, f, dtype, world_size, offload_optimizer, offload_params)


def _zero12_state(
    p: Params, dtype: str, stage: int, n: int, offload: bool, overlap: bool, accum: int
) -> ModelState:
    w, psi, part, mixed = _BYTES[dtype], p.total, -(-p.total // n), dtype != "fp32"
    # Stage 1 reduces only at the accumulation boundary: with grad_accum > 1 every p.grad is
    # kept in between; without overlap_comm the full grads exist at the end of backward.
    full_grads = w * psi if stage == 1 and accum > 1 else 0
    pending = w * psi if stage == 1 and accum == 1 and not overlap else 0
    buckets = w * REDUCE_BUCKET * (2 if overlap else 1) + pending
    if not offload:
        # The partition takes the place of the full gradients it is reduced from.
        grads = max(full_grads, w * part)
        return ModelState(w * psi, grads, 4 * part, 8 * part, buckets, 4 * part * mixed)
    # Host: fp32 master, moments and gradient partition, a 16-bit staging copy of the
    # partition, and a largest-tensor gradient buffer (mirrored on the device).
    largest = max(p.tensors, default=0)
    host = (4 + 8 + 4 + w) * part + w * largest
    return ModelState(w * psi, full_grads, 0, 0, buckets + w * largest, 0, host)


def _zero3_state(
    p: Params, f: Params, dtype: str, n: int, offload_optimizer: bool, offload_params: bool
) -> ModelState:
    # Every parameter, frozen or not, is partitioned and gathered alike; gradients, masters and
    # moments exist for the trainable partition `part` only.
    w, part, held = _BYTES[dtype], p.partition(n), p.plus(f)
    persistent = held.persistent()
    small = [t for t in held.tensors if t <= PERSISTENCE_THRESHOLD]
    largest = max((t for t in held.tensors if t > PERSISTENCE_THRESHOLD), default=0)
    comm = w * (REDUCE_BUCKET + min(held.total - persistent, PREFETCH_BUCKET + largest))
    # Persistent params keep their partition on the device even under offload_params.
    held_part = held.partition(n)
    host_params = w * (held_part - sum(-(-t // n) for t in small)) if offload_params else 0
    params = w * (held_part + persistent) - host_params
    if not offload_optimizer:
        # The fp32 master partition is a clone of the parameter partition even in fp32
        # (measured on live tensors: separate storage), so it is never free.
        return ModelState(params, w * part, 4 * part, 8 * part, comm, 4 * part, host_params)
    # Host: the 16-bit grad partition, an fp32 master copy (even in fp32), moments, fp32 grads.
    return ModelState(params, 0, 0, 0, comm, 0, host_params + (w + 4 + 8 + 4) * part)


def _accelerate_state(
    p: Params, f: Params, dtype: str, stage: int, n: int, offload: bool, accum: int
) -> ModelState:
    psi = p.total
    # torch AdamW: two fp32 moments per trained element and a 4-byte `step` per trained tensor.
    steps = 4 * len(p.tensors)
    if stage == 0:
        # DDP: fp32 params and grads, plus its gradient buckets (a second copy) when N > 1;
        # frozen parameters get neither a gradient nor a bucket.
        ddp = ModelState(4 * (psi + f.total), 4 * psi, 0, 8 * psi + steps)
        return replace(ddp, comm_buffers=4 * psi if n > 1 else 0)
    # FSDP2: every parameter, frozen or not, an fp32 shard; gradients and moments for the trained ones.
    state = ModelState(4 * p.plus(f).shard(n), 4 * p.shard(n), 0, 8 * p.shard(n) + steps)
    # Between micro-batches: whole fp32 gradients, accumulated until the last one's reduce-scatter.
    accumulated = 4 * psi if accum > 1 else 0
    state = replace(state, comm_buffers=_fsdp2_transient(p, p.plus(f), _BYTES[dtype], stage) + accumulated)
    if not offload:
        return state
    # CPUOffloadPolicy: shards, gradients and Adam's state on the host; the unsharded copies on the device.
    return replace(state, params=0, grads=0, optimizer=0, cpu=state.device_state)


def _fsdp2_transient(p: Params, held: Params, w: int, stage: int) -> int:
    """Bytes FSDP2 holds during forward and backward besides the shards: the unsharded
    compute-dtype parameters (`w` bytes each), and one unit's unsharded gradients with the fp32
    reduce-scatter input they are copied into. Without a block size the model is one unit."""
    blocks = held.num_layers if held.layer else 0
    trained_layer = p.layer if blocks else 0
    unit = max(trained_layer, p.total - blocks * trained_layer)
    return w * fsdp2_gathered(held, stage) + (w + 4) * unit


def fsdp2_gathered(held: Params, stage: int) -> int:
    """Elements FSDP2 holds unsharded at once: stage 3 regathers each block for its backward, so
    the root and about two blocks (the current one and the prefetched next one); stages 1-2 keep
    every block's unsharded copy from its forward to its backward. Without a block size, all."""
    blocks = held.num_layers if held.layer else 0
    root = held.total - blocks * held.layer
    return root + min(2, blocks) * held.layer if stage == 3 else held.total
