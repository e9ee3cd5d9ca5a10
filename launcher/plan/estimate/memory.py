"""Will it fit: per-GPU memory of a recipe under ZeRO stages 0-3, from the recipe alone.

    mplaunch plan RECIPE [key=value ...] [--gpu-memory SIZE] [--num-params N]

The byte formulas (and the sources they follow) live in launcher.plan.estimate.state_bytes, the
planner's inputs from a plan in launcher.plan.estimate.setting; this module compares configurations
(DeepSpeed's ZeRO stages; DDP and FSDP2 under accelerate), suggests what fits and prints the
table and the dry run's memory section.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from launcher.errors import UserError
from launcher.plan.estimate.activations import activation_bytes, lora_activation_delta
from launcher.plan.estimate.setting import Setting, setting_of
from launcher.plan.estimate.state_bytes import ModelState, fsdp2_gathered, model_state_bytes

if TYPE_CHECKING:
    from launcher.plan.hardware import Hardware
    from launcher.plan.resolve import Plan

GiB = 2**30
CUDA_CONTEXT_BYTES = 500 * 2**20
HEADROOM = 0.95  # fraction of GPU memory a plan may fill
DEFAULT_GPU_BYTES = 80 * GiB

# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Config:
    """One ZeRO configuration the planner compares."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    def sharding(self, backend: str) -> str:
        """What runs under `backend` (the dry run's name for it): a ZeRO stage, DDP or FSDP2."""
        if backend != "accelerate":
            return f"ZeRO stage {self.stage}"
        if self.stage == 0:
            return "DDP (zero.stage 0)"
        offload = ", CPUOffloadPolicy" if self.offload_params else ""
        return f"FSDP2 reshard_after_forward={self.stage == 3}{offload} (zero.stage {self.stage})"

    def overrides(self) -> str:
        text = f"zero.stage={self.stage}"
        text += " zero.offload_optimizer=true" if self.offload_optimizer else ""
        return text + (" zero.offload_params=true" if self.offload_params else "")


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes of one configuration; activations scale with the micro-batch."""

    config: Config
    state: ModelState
    activations_per_sample: int | None  # None: unknown model
    context: int = CUDA_CONTEXT_BYTES  # 0 for a CPU process
    fp8_casts_per_sample: int = 0  # precision.dtype fp8: one layer's transient fp8 casts (fp8_bytes)
    fp8_casts_fixed: int = 0  # ... the part that does not grow with the micro-batch (the weight's)

    def fp8_casts(self, micro_batch_size: int) -> int:
        return (
            self.fp8_casts_fixed + self.fp8_casts_per_sample * micro_batch_size if self.fp8_casts_fixed else 0
        )

    def total(self, micro_batch_size: int) -> int:
        # The optimizer step runs after backward has freed the activations and comm buckets.
        act = (self.activations_per_sample or 0) * micro_batch_size + self.fp8_casts(micro_batch_size)
        s = self.state
        return s.device_state + self.context + max(act + s.comm_buffers, s.step_buffers)

    def rows(self, micro_batch_size: int) -> list[tuple[str, int | None]]:
        s, per_sample = self.state, self.activations_per_sample
        context = [("CUDA context", self.context)] if self.context else []
        return [
            ("params", s.params),
            ("grads", s.grads),
            ("master (fp32)", s.master),
            ("optimizer", s.optimizer),
            ("comm buffers", s.comm_buffers),
            ("step buffers", s.step_buffers),
            ("activations", None if per_sample is None else per_sample * micro_batch_size),
            *([("fp8 casts", self.fp8_casts(micro_batch_size))] if self.fp8_casts_fixed else []),
            *context,
            ("total", self.total(micro_batch_size)),
        ]

    def max_micro_batch(self, usable_bytes: int) -> int | None:
        """Largest micro-batch that fits, 0 if none does, None if activations are unknown."""
        if self.total(1) > usable_bytes:
            return 0
        if not self.activations_per_sample:
            return None
        room = usable_bytes - self.state.device_state - self.context - self.state.comm_buffers
        room -= self.fp8_casts_fixed
        return max(1, room // (self.activations_per_sample + self.fp8_casts_per_sample))


def estimate(setting: Setting, config: Config) -> Estimate:
    """The per-GPU estimate of `setting` under one ZeRO configuration."""
    s = setting
    # With LoRA the adapters train (grads, masters, moments) and the base is held frozen.
    trains, frozen = (s.lora.params, s.params) if s.lora else (s.params, None)
    state = model_state_bytes(
        trains, s.dtype, s.backend, config.stage, s.world_size, grad_accum=s.grad_accum,
        offload_optimizer=config.offload_optimizer, offload_params=config.offload_params, frozen=frozen,
        overlap_comm=s.device == "cuda",  # as launcher.plan.backend_config sets it
    )  # fmt: skip
    per_sample = None
    if s.shape is not None:
        per_sample = activation_bytes(s.shape, s.seq_len, 1, s.dtype, s.backend, s.dropout)
        if s.lora:
            per_sample += lora_activation_delta(s.shape, s.seq_len, 1, s.dtype, s.backend, s.dropout, s.lora)
    context = CUDA_CONTEXT_BYTES if s.device == "cuda" else 0
    if s.fp8 is None:
        return Estimate(config, state, per_sample, context)
    if s.fp8.all_gather and s.backend == "accelerate" and config.stage > 0:
        # The converted weights' share of what FSDP2 holds unsharded is gathered in fp8: 1 byte, not 2.
        gathered = fsdp2_gathered(s.params, config.stage) * s.fp8.converted // max(s.params.total, 1)
        state = replace(state, comm_buffers=state.comm_buffers - gathered)
    fixed = s.fp8.cast_bytes(0)
    return Estimate(config, state, per_sample, context, s.fp8.cast_bytes(s.seq_len) - fixed, fixed)


def recipe_config(plan: Plan, stage: int, device: str = "cuda") -> Config:
    """The recipe's offload choices, applied to `stage` where that stage allows them, on GPUs
    (a CPU process holds everything in host memory already: offload moves nothing there)."""
    z, gpu = plan.recipe.zero, device == "cuda"
    return Config(stage, gpu and z.offload_optimizer and stage >= 1, gpu and z.offload_params and stage == 3)


def candidates(backend: str, device: str = "cuda") -> list[Config]:
    """Configurations, cheapest first: lower stages, then offload (FSDP2's CPUOffloadPolicy moves
    parameters, gradients and optimizer state at once; stage 1 is stage 2 there). A CPU process
    already holds everything in host memory: offload moves nothing there."""
    if backend == "accelerate":
        plain, offload = [Config(0), Config(2), Config(3)], [Config(3, True, True)]
    else:
        plain = [Config(0), Config(1), Config(2), Config(3)]
        offload = [Config(1, True), Config(2, True), Config(3, True), Config(3, True, True)]
    return plain if device == "cpu" else plain + offload


def suggest(setting: Setting, usable_bytes: int) -> str:
    """One line: the cheapest configuration that fits, and the largest micro-batch for it."""
    estimates = [estimate(setting, c) for c in candidates(setting.backend, setting.device)]
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
    """Stages 0-3 side by side, in GiB per GPU (or CPU process), with the recipe's own stage starred."""
    ests = [estimate(setting, recipe_config(plan, stage, setting.device)) for stage in range(4)]
    m, star = setting.micro_batch_size, plan.recipe.zero.stage
    lines = [
        f"{'GiB per ' + setting.unit:<16}"
        + "".join(f"{f'stage {i}' + '*' * (i == star):>10}" for i in range(4))
    ]
    for i, (label, _) in enumerate(ests[0].rows(m)):
        cells = [e.rows(m)[i][1] for e in ests]
        lines.append(f"{label:<16}" + "".join(f"{'?' if c is None else _gib(c):>10}" for c in cells))
    fits = ["yes" if e.total(m) <= usable_bytes else "no" for e in ests]
    lines.append(f"{'fits':<16}" + "".join(f"{f:>10}" for f in fits))
    lines.append(f"{'CPU (offload)':<16}" + "".join(f"{_gib(e.state.cpu):>10}" for e in ests))
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _lora_line(setting: Setting) -> str:
    lora = setting.lora
    assert lora is not None
    share = 100 * lora.params.total / setting.num_params
    return (
        f"LoRA rank {lora.rank}: {lora.params.total:,} of {setting.num_params:,} parameters train"
        f" ({share:.2f} %); grads, master and optimizer are theirs, params the frozen base plus them"
    )


def describe(plan: Plan, gpu_memory_bytes: int | None = None) -> str:
    """A short section for the dry run: the recipe's own configuration, per GPU (or CPU process)."""
    unit = "GPU" if plan.device == "cuda" else "process"
    title = f"== memory (estimate per {unit}; `mplaunch plan` compares the ZeRO stages) =="
    try:
        setting = setting_of(plan)
    except UserError as err:
        return f"{title}\n{err.lines[0]}"
    est = estimate(setting, recipe_config(plan, plan.recipe.zero.stage, setting.device))
    m = setting.micro_batch_size
    *parts, (_, total) = est.rows(m)
    line = f"{est.config.sharding(setting.backend)}: {_gib(total or 0)} GiB = " + ", ".join(
        f"{label} {'?' if v is None else _gib(v)}" for label, v in parts
    )
    if est.state.cpu:
        line += f"; {_gib(est.state.cpu)} GiB on the CPU"
    if setting.lora is not None:
        line += f"; {_lora_line(setting)}"
    if gpu_memory_bytes is not None:
        fits = est.total(m) <= gpu_memory_bytes * HEADROOM
        line += f"; {'fits' if fits else 'does not fit'} in {_gib(gpu_memory_bytes)} GiB"
    return f"{title}\n{line}"


def _fsdp2_legend(dtype: str, grad_accum: int) -> str:
    """What accelerate's columns run, and what FSDP2's comm buffers hold."""
    return (
        "accelerate: stage 0 = DDP; stages 1-2 = FSDP2 reshard_after_forward=False, stage 3 = FSDP2"
        " reshard_after_forward=True (fully_shard per transformer block, then the root): fp32 shards of"
        " parameters, gradients and Adam state, no master copy\n"
        f"        FSDP2's comm buffers = the {dtype} unsharded parameters during forward and backward"
        " (stage 3: the root and about two blocks; stages 1-2: all) + one unit's unsharded gradients"
        " and their fp32 reduce-scatter input"
        + (f" + the whole fp32 gradients, accumulated over grad_accum {grad_accum}" if grad_accum > 1 else "")
    )


# --------------------------------------------------------------------------- mplaunch plan


def _target(gpu_memory: tuple[int, str] | None, hardware: Hardware, plan: Plan) -> tuple[int, str]:
    """Bytes of GPU memory (or host memory per CPU process) to plan for, and where that number comes from."""
    if gpu_memory is not None:
        size, text = gpu_memory
        return size, f"{_gib(size)} GiB per GPU (--gpu-memory {text})"
    if plan.device == "cpu" and hardware.memory_bytes:
        per = hardware.memory_bytes // plan.nproc_per_node
        return per, (
            f"{_gib(per)} GiB per process (this machine's {_gib(hardware.memory_bytes)} GiB over"
            f" {plan.nproc_per_node} processes; --gpu-memory plans for GPUs instead)"
        )
    if hardware.gpus:
        gpu = min(hardware.gpus, key=lambda g: g.memory_bytes)
        return gpu.memory_bytes, f"{_gib(gpu.memory_bytes)} GiB per GPU ({gpu.name})"
    return DEFAULT_GPU_BYTES, "80.00 GiB per GPU (assumed: no GPU is visible and --gpu-memory was not given)"


def show(
    plan: Plan, hardware: Hardware, gpu_memory: tuple[int, str] | None = None, num_params: int | None = None
) -> None:
    """`mplaunch plan`: print the memory table for ZeRO stages 0-3 and a suggestion: per GPU, or per
    process for a CPU plan (launch.device cpu) unless `gpu_memory` asks for GPUs.

    Args:
        plan: the recipe's plan (resolved with its problems kept: it may be meant for another machine).
        hardware: this machine; its smallest GPU is the target unless `gpu_memory` is given.
        gpu_memory: bytes per GPU to plan for, and the --gpu-memory text they were read from.
        num_params: parameter count of a model.target model (--num-params).
    """
    gpu_bytes, target = _target(gpu_memory, hardware, plan)
    s = setting_of(plan, num_params)
    if gpu_memory is not None or not hardware.memory_bytes:
        s = replace(s, device="cuda")
    usable = int(gpu_bytes * HEADROOM)
    m = plan.recipe.model
    model = f"{m.name} {m.size}" if s.shape else (m.target or m.hf or m.name)
    print(
        f"memory plan for {plan.recipe.name}: {model}, {s.num_params / 1e6:.1f}M parameters,"
        f" {s.dtype} ({plan.precision.reason}), {s.backend}, world_size {s.world_size},"
        f" micro_batch_size {s.micro_batch_size}, seq_len {s.seq_len}"
    )
    if s.lora is not None:
        print(_lora_line(s))
    print(f"target: {target}; fits means total <= {HEADROOM:.0%} of it ({_gib(usable)} GiB)")
    print(table(s, plan, usable))
    print("total = params + grads + master + optimizer" + (" + context" if s.device == "cuda" else ""))
    print("        + max(activations + comm buffers, step buffers): the step runs after backward frees them")
    print("* = the recipe's stage, with its offload settings where the stage allows them")
    if s.backend == "accelerate":
        print(_fsdp2_legend(s.dtype, s.grad_accum))
    if s.shape is None:
        print("activations: unknown for this model, left out of the totals")
    print(suggest(s, usable))
