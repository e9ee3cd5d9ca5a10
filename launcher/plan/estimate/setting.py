"""The memory planner's inputs from a resolved plan: the model's parameters (and model.lora's
adapters), its shape, and the batch, precision and backend around them (launcher.plan.estimate.memory
compares the ZeRO configurations for them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.errors import UserError
from launcher.plan import hf_dir
from launcher.plan.estimate import flops, fp8_bytes
from launcher.plan.estimate.state_bytes import LoraSetting, Params, lora_params, lora_unmatched
from launcher.recipe.shapes import Shape

if TYPE_CHECKING:
    from launcher.plan.resolve import Plan


@dataclass(frozen=True)
class Setting:
    """Everything but the ZeRO configuration, taken from a plan."""

    params: Params  # the model's own parameters (with LoRA: the frozen base)
    shape: Shape | None  # None: a model without an activation formula
    dtype: str
    backend: str
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int
    seq_len: int
    dropout: float
    lora: LoraSetting | None = None  # model.lora: only its adapters train
    device: str = "cuda"  # cpu: each process holds its state in host memory, without a CUDA context
    fp8: fp8_bytes.Fp8Weights | None = None  # precision.dtype fp8: the converted layers

    @property
    def unit(self) -> str:
        """What one estimate is of: a GPU, or a CPU process."""
        return "GPU" if self.device == "cuda" else "process"

    @property
    def num_params(self) -> int:
        return self.params.total + (self.lora.params.total if self.lora else 0)


def setting_of(plan: Plan, num_params: int | None = None, num_trainable: int | None = None) -> Setting:
    """The planner's inputs from a resolved plan; `num_params` stands in for an unknown model.

    Args:
        plan: the resolved plan.
        num_params: the model's parameter count, for a model the planner cannot count.
        num_trainable: with model.lora, the adapters' parameter count, for the same reason.

    Raises:
        UserError: the model has no parameter count and num_params is None; with model.lora, the
            adapters cannot be counted and num_trainable is None, or a target module matches nothing.
    """
    r, b = plan.recipe, plan.batch
    shape = plan.shape
    if num_params is None and shape is None and plan.num_params is not None:
        num_params = plan.num_params  # model.hf: counted from its safetensors headers
    if num_params is not None or shape is None or flops.param_tensors(shape) is None:
        if num_params is None:
            raise UserError(
                f"model {r.model.target or r.model.hf or r.model.name}: the planner cannot count its parameters",
                hint="pass --num-params, e.g. 350M",
            )
        params, shape = Params(num_params), None
    else:
        params = Params.of(shape)
    lora = _lora_of(plan, shape, num_trainable)
    return Setting(
        params, shape, plan.precision.compute_dtype, r.backend, b.world_size, b.micro_batch_size,
        b.global_batch_size, b.grad_accum, r.data.seq_len, r.model.dropout, lora, plan.device,
        fp8_bytes.of(plan),
    )  # fmt: skip


def _lora_of(plan: Plan, shape: Shape | None, num_trainable: int | None) -> LoraSetting | None:
    """model.lora's adapters, counted from the built-in shape (launcher.worker.lora adds the same ones)."""
    lora, model = plan.recipe.model.lora, plan.recipe.model
    if not lora.rank:
        return None
    targets = tuple(lora.target_modules)
    if num_trainable is not None:
        return LoraSetting(lora.rank, lora.dropout, Params(num_trainable), targets)
    if shape is None and plan.hf_dir is not None:
        return _hf_lora_of(plan)
    adapters = lora_params(shape, lora.rank, targets) if shape is not None else None
    if shape is None or adapters is None:
        name = model.target or model.hf or model.name
        raise UserError(
            f"model {name} with model.lora: the planner cannot count its adapters",
            hint="LoRA adds rank x (in + out) parameters per adapted linear layer",
        )
    unmatched = lora_unmatched(shape, targets)
    if unmatched:
        raise UserError(
            f"model.lora.target_modules: {unmatched[0]!r} matches no linear layer of {shape.family}"
        )
    return LoraSetting(lora.rank, lora.dropout, adapters, targets)


def _hf_lora_of(plan: Plan) -> LoraSetting:
    """model.lora on model.hf: the adapters counted from the directory's safetensors headers."""
    lora, model = plan.recipe.model.lora, plan.recipe.model
    assert plan.hf_dir is not None
    hf = hf_dir.read(plan.hf_dir, "", dict(model.config))[0]
    targets = tuple(lora.target_modules)
    unmatched = hf_dir.lora_unmatched(hf, targets) if hf is not None else []
    if hf is not None and unmatched:
        raise UserError(f"model.lora.target_modules: {unmatched[0]!r} matches no linear layer of {hf.source}")
    count = hf_dir.lora_params(hf, lora.rank, targets, plan.model.num_labels) if hf is not None else None
    if count is None:
        raise UserError(
            f"model {model.hf} with model.lora: the planner cannot count its adapters",
            hint="name model.lora.target_modules (linear layers, as in the model's safetensors)",
        )
    return LoraSetting(lora.rank, lora.dropout, Params(count), targets)
