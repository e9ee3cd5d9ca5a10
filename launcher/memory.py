"""Will it fit: per-GPU memory of a recipe under ZeRO stages 0-3, from the recipe alone.

    mplaunch plan RECIPE [key=value ...] [--gpu-memory SIZE] [--num-params N]

Model state (Psi parameters, N data-parallel ranks, Adam) follows the ZeRO paper
for mixed precision, 16 bytes per parameter: 2 (16-bit params) + 2 (16-bit grads)
+ 4 (fp32 master) + 8 (two fp32 moments). Stage 1 keeps 4Psi + 12Psi/N, stage 2
2Psi + 14Psi/N, stage 3 16Psi/N. Where DeepSpeed 0.19 (read from its source:
runtime/zero/stage_1_and_2.py, stage3.py, fp16/unfused_optimizer.py) differs:

* fp32 runs: params and grads are 4 bytes. Stages 1-2 still clone an fp32
  master partition (4Psi/N); stage 0 (plain torch AdamW) has none, stage 3 clones it.
* stage 1 reduces gradients only at the accumulation boundary: with grad_accum
  > 1 it keeps every 16-bit gradient between micro-batches (the paper's 2Psi);
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

Accelerate trains fp32 parameters under autocast: 4 (params) + 4 (grads) + 8
(moments), no separate master. DDP (N > 1) adds its gradient buckets (4Psi,
gradient_as_bucket_view off). FSDP (stages 1-3, GPU only) shards params, grads and
moments; SHARD_GRAD_OP holds all unsharded compute-dtype params through
forward and backward, FULL_SHARD about the root (embeddings, head) plus two
transformer layers (current and prefetched), with their gradients.

Activations per transformer layer: Korthikanti et al. 2022 count s*b*h*(34 +
5*a*s/h) bytes in 16-bit (I = 4h); the built-in models use SDPA, which keeps Q, K,
V, its output and an fp32 log-sum-exp instead of the s^2 score, softmax and mask
tensors (term by term in `_layer_activation_bytes`). Plus embeddings, head, and
the loss tail 3*s*b*V*e_ls at the head's backward (checked tensor by tensor
against autograd's saved tensors on CPU). Not modelled: backward temporaries of
one layer, allocator fragmentation (we keep 5 % headroom). The CUDA context
(driver, cuBLAS workspace) is taken as 500 MiB; torch.cuda.max_memory_allocated
does not see it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from launcher import flops
from launcher.errors import UserError
from launcher.shapes import Shape

if TYPE_CHECKING:
    from launcher.hardware import Hardware
    from launcher.plan import Plan

GiB = 2**30
CUDA_CONTEXT_BYTES = 500 * 2**20
HEADROOM = 0.95  # fraction of GPU memory a plan may fill
DEFAULT_GPU_BYTES = 80 * GiB
# DeepSpeed's zero_optimization defaults, which our generated config leaves alone.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
PERSISTENCE_THRESHOLD = 100_000
ALLREDUCE_CHUNK = 500_000_000
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Params:
    """What the model-state formulas need to know about a model's parameters."""

    total: int
    tensors: tuple[int, ...] = ()  # numel per tensor when known: stage-3 padding and persistence
    layer: int = 0  # one transformer block, an FSDP unit under per-layer wrapping (0: unknown)
    num_layers: int = 0

    @classmethod
    def of(cls, model: Shape | int) -> Params:
        if isinstance(model, int):
            return cls(model)
        tensors = flops.param_tensors(model)
        assert tensors is not None, f"no parameter hook for {model.family}"
        numels = tuple(n for _, n in tensors)
        if model.family == "tiny-mlp":
            return cls(sum(numels), numels)
        return cls(sum(numels), numels, flops.layer_param_count(model), model.num_layers)

    def persistent(self) -> int:
        """Elements stage 3 keeps whole on every rank (tensors within the persistence threshold)."""
        return sum(n for n in self.tensors if n <= PERSISTENCE_THRESHOLD)

    def partition(self, world: int) -> int:
        """Elements of this rank's stage-3 partition: each tensor padded to a multiple of world."""
        return sum(-(-n // world) for n in self.tensors) if self.tensors else -(-self.total // world)


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
) -> ModelState:
    """Model-state bytes per rank for Adam(W), by category.

    What each row counts, as a measurement would sum numel * element_size after
    backward at an accumulation boundary, before the step:
      params     DeepSpeed stages 0-2: every p in model.parameters(). Stage 3: every
                 p.ds_tensor, plus p.data of the persistent ones (p.ds_persist).
                 Accelerate: the fp32 parameters (FSDP: this rank's flat shard).
      grads      DeepSpeed stage 0: every p.grad. Stages 1-2: optimizer.averaged_gradients
                 (stage 1 with grad_accum > 1 also keeps every p.grad between micro-batches).
                 Stage 3: optimizer.grad_partitions_flat_buffer. Accelerate: p.grad (fp32).
      master     Stage 0 mixed: optimizer.fp32_groups. Stages 1-2:
                 optimizer.single_partition_of_fp32_groups. Stage 3 mixed:
                 optimizer.fp32_partitioned_groups_flat (a clone of the partition, fp32 too).
      optimizer  exp_avg and exp_avg_sq in the torch optimizer's state (`step` ignored).
    With offload the same tensors exist, on the host: the rows then show device bytes
    only and `cpu` the host side plus its staging buffers, so compare a measurement
    with the offload=False numbers. Accelerate with stage >= 1 is FSDP, which mplaunch
    uses on GPUs only; a CPU accelerate run is DDP, so pass stage 0 for it.

    Args:
        model: a built-in shape, a parameter count, or a Params.
        dtype: compute dtype: fp32, bf16 or fp16.
        backend: deepspeed or accelerate.
        stage: ZeRO stage 0-3.
        world_size: data-parallel ranks.
        offload_optimizer: ZeRO-Offload of the optimizer state (stage >= 1).
        offload_params: stage-3 parameter offload (accelerate: FSDP cpu_offload).
        overlap_comm: DeepSpeed's zero_optimization.overlap_comm (ours: on for CUDA).
        grad_accum: micro-batches per optimizer step.
    """
    p = model if isinstance(model, Params) else Params.of(model)
    if backend == "accelerate":
        return _accelerate_state(p, dtype, stage, world_size, offload_params)
    if stage == 0:
        w, psi, mixed = _BYTES[dtype], p.total, dtype != "fp32"
        # DeepSpeed's unfused fp16/bf16 optimizer: fp32 master copies, fp32 grads made at the step.
        chunk = w * min(psi, ALLREDUCE_CHUNK) if world_size > 1 else 0
        return ModelState(w * psi, w * psi, 4 * psi * mixed, 8 * psi, chunk, 4 * psi * mixed)
    if stage < 3:
        return _zero12_state(p, dtype, stage, world_size, offload_optimizer, overlap_comm, grad_accum)
    return _zero3_state(p, dtype, world_size, offload_optimizer, offload_params)


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
        return ModelState(w * psi, full_grads + w * part, 4 * part, 8 * part, buckets, 4 * part * mixed)
    # Host: fp32 master, moments and gradient partition, a 16-bit staging copy of the
    # partition, and a largest-tensor gradient buffer (mirrored on the device).
    largest = max(p.tensors, default=0)
    host = (4 + 8 + 4 + w) * part + w * largest
    return ModelState(w * psi, full_grads, 0, 0, buckets + w * largest, 0, host)


def _zero3_state(p: Params, dtype: str, n: int, offload_optimizer: bool, offload_params: bool) -> ModelState:
    w, psi, part = _BYTES[dtype], p.total, p.partition(n)
    persistent = p.persistent()
    small = [t for t in p.tensors if t <= PERSISTENCE_THRESHOLD]
    largest = max((t for t in p.tensors if t > PERSISTENCE_THRESHOLD), default=0)
    comm = w * (REDUCE_BUCKET + min(psi - persistent, PREFETCH_BUCKET + largest))
    # Persistent params keep their partition on the device even under offload_params.
    host_params = w * (part - sum(-(-t // n) for t in small)) if offload_params else 0
    params = w * (part + persistent) - host_params
    if not offload_optimizer:
        # The fp32 master partition is a clone of the parameter partition even in fp32
        # (measured on live tensors: separate storage), so it is never free.
        return ModelState(params, w * part, 4 * part, 8 * part, comm, 4 * part, host_params)
    # Host: the 16-bit grad partition, an fp32 master copy (even in fp32), moments, fp32 grads.
    return ModelState(params, 0, 0, 0, comm, 0, host_params + (w + 4 + 8 + 4) * part)


def _accelerate_state(p: Params, dtype: str, stage: int, n: int, offload: bool) -> ModelState:
    psi = p.total
    if stage == 0:
        # DDP: fp32 params and grads, plus its gradient buckets (a second copy) when N > 1.
        return ModelState(4 * psi, 4 * psi, 0, 8 * psi, comm_buffers=4 * psi if n > 1 else 0)
    part = -(-psi // n)
    # FULL_SHARD: the root unit (everything outside the blocks) stays gathered, plus the
    # current and the prefetched layer; without a layer size, assume the whole model.
    unsharded = psi if stage < 3 or not p.layer else min(psi, psi - (p.num_layers - 2) * p.layer)
    # The unsharded compute-dtype params, and their gradients before the reduce-scatter.
    state = ModelState(4 * part, 4 * part, 0, 8 * part, comm_buffers=2 * _BYTES[dtype] * unsharded)
    return replace(state, params=0, grads=0, optimizer=0, cpu=16 * part) if offload else state


# --------------------------------------------------------------------------- activations


def activation_bytes(
    shape: Shape, seq_len: int, micro_batch_size: int, dtype: str, backend: str, dropout: float
) -> int:
    """Activation bytes of one micro-batch at the backward peak (the head's loss backward)."""
    s, b, h = seq_len, micro_batch_size, shape.hidden_size
    e = _BYTES[dtype]
    # Autocast keeps LayerNorm inputs (the residual stream) in fp32; DeepSpeed casts the whole model.
    e_ln = 4 if backend == "accelerate" else e
    mask = 1 if dropout > 0 else 0  # CUDA dropout keeps a bool mask
    # Loss tail: the saved log-softmax, its gradient and the logits' gradient, all s*b*V, in fp32:
    # every built-in model computes its loss from logits upcast to fp32 (launcher.models.LMLoss).
    tail = 3 * 4 * s * b * shape.vocab_size
    if shape.family == "tiny-mlp":
        inter = shape.intermediate_size
        return s * b * (2 * h * e + 2 * inter * e + inter * mask) + tail
    layers = shape.num_layers * _layer_activation_bytes(shape, s, b, e, e_ln, mask)
    if shape.family == "bert-mlm":
        # Embedding LayerNorm input and dropout; head: dense, GELU, LayerNorm and decoder inputs.
        return layers + s * b * h * (e_ln + mask + 3 * e + e_ln) + tail
    # GPT-2: embedding dropout; ln_f input and lm_head input.
    return layers + s * b * h * (mask + e_ln + e) + tail


def _layer_activation_bytes(shape: Shape, s: int, b: int, e: int, e_ln: int, mask: int) -> int:
    """Korthikanti et al.'s 34*s*b*h (16-bit, I = 4h), with SDPA in place of the 5*a*s^2*b terms."""
    h, a, inter = shape.hidden_size, shape.num_heads, shape.intermediate_size
    # GPT-2's tanh GELU ("gelu_new") is built from pointwise ops that keep 3 more s*b*I tensors.
    gelu_extra = 3 if shape.family == "gpt2-lm" else 0
    sbh = s * b * h
    attention = (
        sbh * e  # QKV projection input
        + 3 * sbh * e  # Q, K, V, kept by SDPA
        + sbh * e  # SDPA output = output projection input (a view)
        + a * s * b * 4  # SDPA's fp32 log-sum-exp; no s^2 scores, softmax or dropout mask
        + sbh * mask  # dropout after the projection
        + sbh * e_ln  # residual sum into LayerNorm
    )
    mlp = (
        sbh * e  # first linear input
        + s * b * inter * e * (2 + gelu_extra)  # GELU input, second linear input
        + sbh * mask
        + sbh * e_ln  # residual sum into LayerNorm
    )
    return attention + mlp


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Config:
    """One ZeRO configuration the planner compares."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    def overrides(self) -> str:
        text = f"zero.stage={self.stage}"
        text += " zero.offload_optimizer=true" if self.offload_optimizer else ""
        return text + (" zero.offload_params=true" if self.offload_params else "")


@dataclass(frozen=True)
class Setting:
    """Everything but the ZeRO configuration, taken from a plan."""

    params: Params
    shape: Shape | None  # None: a model without an activation formula
    dtype: str
    backend: str
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int
    seq_len: int
    dropout: float


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes of one configuration; activations scale with the micro-batch."""

    config: Config
    state: ModelState
    activations_per_sample: int | None  # None: unknown model

    def total(self, micro_batch_size: int) -> int:
        # The optimizer step runs after backward has freed the activations and comm buckets.
        act = (self.activations_per_sample or 0) * micro_batch_size
        s = self.state
        return s.device_state + CUDA_CONTEXT_BYTES + max(act + s.comm_buffers, s.step_buffers)

    def rows(self, micro_batch_size: int) -> list[tuple[str, int | None]]:
        s, per_sample = self.state, self.activations_per_sample
        return [
            ("params", s.params),
            ("grads", s.grads),
            ("master (fp32)", s.master),
            ("optimizer", s.optimizer),
            ("comm buffers", s.comm_buffers),
            ("step buffers", s.step_buffers),
            ("activations", None if per_sample is None else per_sample * micro_batch_size),
            ("CUDA context", CUDA_CONTEXT_BYTES),
            ("total", self.total(micro_batch_size)),
        ]

    def max_micro_batch(self, usable_bytes: int) -> int | None:
        """Largest micro-batch that fits, 0 if none does, None if activations are unknown."""
        if self.total(1) > usable_bytes:
            return 0
        if not self.activations_per_sample:
            return None
        room = usable_bytes - self.state.device_state - CUDA_CONTEXT_BYTES - self.state.comm_buffers
        return max(1, room // self.activations_per_sample)


def estimate(setting: Setting, config: Config) -> Estimate:
    """The per-GPU estimate of `setting` under one ZeRO configuration."""
    s = setting
    state = model_state_bytes(
        s.params, s.dtype, s.backend, config.stage, s.world_size, grad_accum=s.grad_accum,
        offload_optimizer=config.offload_optimizer, offload_params=config.offload_params,
    )  # fmt: skip
    per_sample = None
    if s.shape is not None:
        per_sample = activation_bytes(s.shape, s.seq_len, 1, s.dtype, s.backend, s.dropout)
    return Estimate(config, state, per_sample)


def setting_of(plan: Plan, num_params: int | None = None) -> Setting:
    """The planner's inputs from a resolved plan; `num_params` stands in for an unknown model.

    Raises:
        UserError: the model has no parameter count and num_params is None.
    """
    r, b = plan.recipe, plan.batch
    shape = plan.shape
    if num_params is not None or shape is None or flops.param_tensors(shape) is None:
        if num_params is None:
            raise UserError(
                f"model {r.model.target or r.model.name}: the planner cannot count its parameters",
                hint="pass --num-params, e.g. 350M",
            )
        params, shape = Params(num_params), None
    else:
        params = Params.of(shape)
    return Setting(
        params, shape, plan.precision.dtype, r.backend, b.world_size, b.micro_batch_size,
        b.global_batch_size, b.grad_accum, r.data.seq_len, r.model.dropout,
    )  # fmt: skip


def recipe_config(plan: Plan, stage: int) -> Config:
    """The recipe's offload choices, applied to `stage` where that stage allows them."""
    z = plan.recipe.zero
    return Config(stage, z.offload_optimizer and stage >= 1, z.offload_params and stage == 3)


def candidates(backend: str) -> list[Config]:
    """Configurations, cheapest first: lower stages, then offload (FSDP offloads everything at once)."""
    if backend == "accelerate":
        return [Config(0), Config(2), Config(3), Config(3, True, True)]
    offload = [Config(1, True), Config(2, True), Config(3, True), Config(3, True, True)]
    return [Config(0), Config(1), Config(2), Config(3), *offload]


def suggest(setting: Setting, usable_bytes: int) -> str:
    """One line: the cheapest configuration that fits, and the largest micro-batch for it."""
    estimates = [estimate(setting, c) for c in candidates(setting.backend)]
    micro = setting.micro_batch_size
    fitting = [e for e in estimates if e.total(micro) <= usable_bytes]
    if fitting:
        best = fitting[0]
        fit = f"{best.config.overrides()} fits ({_gib(best.total(micro))} GiB)"
        return f"suggestion: {fit}{_largest(setting, best, usable_bytes)}"
    smaller = [e for e in estimates if e.max_micro_batch(usable_bytes) != 0]
    if smaller:
        best = smaller[0]
        return (
            f"suggestion: nothing fits at micro_batch_size {micro}; {best.config.overrides()} fits"
            f" with a smaller micro-batch{_largest(setting, best, usable_bytes)}"
        )
    last = estimates[-1]
    return (
        f"nothing fits in {_gib(usable_bytes)} GiB, not even {last.config.overrides()} at micro_batch_size 1"
        f" ({_gib(last.total(1))} GiB); use more GPUs (launch.nproc_per_node, launch.nnodes)"
        " or a smaller model"
    )


def _largest(setting: Setting, est: Estimate, usable_bytes: int) -> str:
    most = est.max_micro_batch(usable_bytes)
    if most is None:
        return "; this model's activations are unknown, so no micro-batch limit is given"
    text = f"; largest micro_batch_size for it: {most}"
    # global = micro x grad_accum x world: the largest micro-batch that keeps the recipe's global batch.
    per_rank = setting.global_batch_size // setting.world_size
    keep = max((m for m in range(1, min(most, per_rank) + 1) if per_rank % m == 0), default=0)
    if keep != most:
        accum = per_rank // keep
        text += f" ({keep} with grad_accum {accum} keeps global_batch_size {setting.global_batch_size})"
    return text


# --------------------------------------------------------------------------- output


def table(setting: Setting, plan: Plan, usable_bytes: int) -> str:
    """Stages 0-3 side by side, in GiB per GPU, with the recipe's own stage starred."""
    ests = [estimate(setting, recipe_config(plan, stage)) for stage in range(4)]
    m, star = setting.micro_batch_size, plan.recipe.zero.stage
    lines = [f"{'GiB per GPU':<16}" + "".join(f"{f'stage {i}' + '*' * (i == star):>10}" for i in range(4))]
    for i, (label, _) in enumerate(ests[0].rows(m)):
        cells = [e.rows(m)[i][1] for e in ests]
        lines.append(f"{label:<16}" + "".join(f"{'?' if c is None else _gib(c):>10}" for c in cells))
    fits = ["yes" if e.total(m) <= usable_bytes else "no" for e in ests]
    lines.append(f"{'fits':<16}" + "".join(f"{f:>10}" for f in fits))
    lines.append(f"{'CPU (offload)':<16}" + "".join(f"{_gib(e.state.cpu):>10}" for e in ests))
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def describe(plan: Plan, gpu_memory_bytes: int | None = None) -> str:
    """A short section for the dry run: the recipe's own configuration, per GPU."""
    title = "== memory (estimate per GPU; `mplaunch plan` compares the ZeRO stages) =="
    try:
        setting = setting_of(plan)
    except UserError as err:
        return f"{title}\n{err.lines[0]}"
    est = estimate(setting, recipe_config(plan, plan.recipe.zero.stage))
    m = setting.micro_batch_size
    *parts, (_, total) = est.rows(m)
    line = f"ZeRO stage {est.config.stage}: {_gib(total or 0)} GiB = " + ", ".join(
        f"{label} {'?' if v is None else _gib(v)}" for label, v in parts
    )
    if est.state.cpu:
        line += f"; {_gib(est.state.cpu)} GiB on the CPU"
    if gpu_memory_bytes is not None:
        fits = est.total(m) <= gpu_memory_bytes * HEADROOM
        line += f"; {'fits' if fits else 'does not fit'} in {_gib(gpu_memory_bytes)} GiB"
    return f"{title}\n{line}"


# --------------------------------------------------------------------------- command line

_UNITS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """80GB (decimal), 80GiB or 80G (binary, as Slurm reads it), 512MiB, ... -> bytes.

    Raises:
        UserError: not a positive size with a unit.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt])(i?b?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory: expected a size such as 80GB, 80GiB or 24G, got {text!r}")
    number, unit, suffix = match.groups()
    base = 1000 if suffix.lower() == "b" else 1024
    return int(float(number) * base ** _UNITS[unit.lower()])


def _parse_count(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmb]?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--num-params: expected a count such as 350M or 1.3B, got {text!r}")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}", hint=f"see {self.prog} --help")


def _target(gpu_memory: str | None, hardware: Hardware) -> tuple[int, str]:
    """Bytes of GPU memory to plan for, and where that number comes from."""
    if gpu_memory is not None:
        size = parse_size(gpu_memory)
        return size, f"{_gib(size)} GiB per GPU (--gpu-memory {gpu_memory})"
    if hardware.gpus:
        gpu = min(hardware.gpus, key=lambda g: g.memory_bytes)
        return gpu.memory_bytes, f"{_gib(gpu.memory_bytes)} GiB per GPU ({gpu.name})"
    return DEFAULT_GPU_BYTES, "80.00 GiB per GPU (assumed: no GPU is visible and --gpu-memory was not given)"


def main(argv: Sequence[str]) -> int:
    """`mplaunch plan`: print the per-GPU memory table for ZeRO stages 0-3 and a suggestion."""
    from launcher import recipe as recipe_mod
    from launcher.hardware import Hardware
    from launcher.plan import resolve

    p = _Parser(prog="mplaunch plan", description="Estimate per-GPU memory under ZeRO stages 0-3.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpu-memory", metavar="SIZE", help="80GB (10^9 bytes), 80GiB or 80G; default: the GPU's")
    p.add_argument("--num-params", metavar="N", help="parameter count of a model.target model, e.g. 350M")
    args = p.parse_intermixed_args(list(argv))
    num_params = _parse_count(args.num_params) if args.num_params is not None else None
    hardware = Hardware.probe()
    gpu_bytes, target = _target(args.gpu_memory, hardware)
    recipe = recipe_mod.load(recipe_mod.locate(args.recipe), args.overrides)
    plan = resolve(recipe, hardware, nnodes_allowed=True, keep_machine_problems=True)
    s = setting_of(plan, num_params)
    usable = int(gpu_bytes * HEADROOM)
    m = recipe.model
    model = f"{m.name} {m.size}" if s.shape else (m.target or m.name)
    print(
        f"memory plan for {recipe.name}: {model}, {s.params.total / 1e6:.1f}M parameters,"
        f" {s.dtype} ({plan.precision.reason}), {s.backend}, world_size {s.world_size},"
        f" micro_batch_size {s.micro_batch_size}, seq_len {s.seq_len}"
    )
    print(f"target: {target}; fits means total <= {HEADROOM:.0%} of it ({_gib(usable)} GiB)")
    print(table(s, plan, usable))
    print("total = params + grads + master + optimizer + context")
    print("        + max(activations + comm buffers, step buffers): the step runs after backward frees them")
    print("* = the recipe's stage, with its offload settings where the stage allows them")
    if s.shape is None:
        print("activations: unknown for this model, left out of the totals")
    print(suggest(s, usable))
    return 0
