"""precision.dtype fp8 in the worker: the plan's chosen linear layers swapped for torchao's float8 ones.

`convert` runs on the built model (launcher.worker.model_setup.model_for), before a backend wraps
it. The layers are the model's nn.Linear and transformers Conv1D (GPT-2's blocks), named relative
to the transformers model inside the loss wrapper (LMLoss.lm) as the plan names them, and chosen by
the plan's own rule (launcher.plan.fp8_layers.choose); where the plan knew the layers
(`precision.fp8.converted` not null) the two lists must be the same, or the run stops naming the
difference.

An nn.Linear becomes torchao's Float8Linear (`Float8Linear.from_float`, which keeps the weight and
bias Parameters); a Conv1D becomes `Float8Conv1D`, a Float8Linear whose weight keeps Conv1D's
(in, out) layout. Both compute `x @ W` with x and W cast to e4m3 and the output gradient to e5m2,
each with a dynamic scale (one per tensor for `tensorwise`, per row for `rowwise`), accumulating in
high precision. The parameters stay the model's own fp32 master weights under the same names and
shapes, so checkpoints, resume and export see a plain model; torchao's modules hold no state of
their own (dynamic scaling keeps no amax history).

Every other op computes in bf16 (autocast, DeepSpeed's bf16, FSDP2's bf16 gathering: the policy's
`compute_dtype`). On CPU the fp8 matrix products are emulated (`emulate=True`: the fp8 casts are
real, the product is taken in fp32), so the numerics can be tested anywhere but nothing is faster.
On FSDP2 with tensorwise scaling on CUDA (`precision.fp8.all_gather`), the weights are gathered in
fp8 (`enable_fsdp_float8_all_gather`) and `after_optimizer_step` computes the next step's weight
scales for all layers at once, one all-reduce.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from launcher.plan import fp8_layers
from launcher.worker.models import ModelError


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep what importing torchao prints or warns out of the rank's output (its log records are
    already held back: launcher.worker sets NOISY_LOGGERS to errors when it is imported)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def torchao_float8() -> Any:
    """torchao.float8, imported quietly.

    Raises:
        ModelError: torchao is not installed (the plan's extras check names it first).
    """
    with _quiet():
        try:
            import torchao.float8 as float8
            import torchao.float8.float8_linear  # the module Float8Conv1D builds on
        except ImportError as exc:
            raise ModelError(
                f"precision.dtype fp8 needs torchao (pip install 'torchao==0.18.0'): {exc}"
            ) from None
        # What transformers' modelling imports of torchao when it is installed (its torchao
        # quantizer), which logs a pytree notice of its own on first import.
        with contextlib.suppress(ImportError):
            import torchao.prototype.safetensors.safetensors_support  # noqa: F401
    return float8


def conv1d_class() -> type[nn.Module] | None:
    """transformers' Conv1D (GPT-2's linear layers), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_layers(root: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of `root`'s nn.Linear and Conv1D layers, in module order.

    Conv1D stores its weight (in, out), nn.Linear (out, in).
    """
    conv1d = conv1d_class()
    out = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            out.append((name, module.in_features, module.out_features))
        elif conv1d is not None and isinstance(module, conv1d):
            fan_in, fan_out = cast(torch.Tensor, module.weight).shape
            out.append((name, int(fan_in), int(fan_out)))
    return out


def layers_root(model: nn.Module) -> nn.Module:
    """The module the plan's layer names are relative to: the transformers model inside the loss
    wrapper (LMLoss, ClassifierLoss: `.lm`), else the model itself."""
    found = getattr(model, "lm", None)
    return found if isinstance(found, nn.Module) else model


def float8_config(fp8: dict[str, Any], device_type: str) -> Any:
    """torchao's Float8LinearConfig for the plan's fp8 settings on `device_type`."""
    float8 = torchao_float8()
    base = float8.Float8LinearConfig.from_recipe_name(fp8["scaling"])
    return _replace(
        base,
        emulate=device_type != "cuda",
        enable_fsdp_float8_all_gather=bool(fp8.get("all_gather")),
    )


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, **changes)


def convert(model: nn.Module, fp8: dict[str, Any], device_type: str) -> tuple[list[str], dict[str, str]]:
    """Swap the layers the plan's rule chooses for fp8 ones, in place; the converted names and the
    kept ones with their reasons.

    Args:
        model: the built model (a loss wrapper, or a user's model.target module).
        fp8: the plan's `precision.fp8` dict.
        device_type: where the run computes ("cpu" emulates the fp8 matrix products).

    Raises:
        ModelError: the built model's layers are not the ones the plan chose.
    """
    root = layers_root(model)
    layers = linear_layers(root)
    converted, kept = fp8_layers.choose(layers, fp8["keep_first_last"], fp8["keep"])
    planned = fp8.get("converted")
    if planned is not None and list(planned) != converted:
        raise ModelError(_disagreement(planned, converted))
    config = float8_config(fp8, device_type)
    chosen = set(converted)
    conv1d = conv1d_class()
    linear_cls = _classes()[0]
    for name, module in list(root.named_modules()):
        if name not in chosen:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        if isinstance(module, nn.Linear):
            swapped = linear_cls.from_float(module, config=config)
        else:
            assert conv1d is not None, name
            assert isinstance(module, conv1d), name
            swapped = _classes()[1].from_conv1d(module, config)
        setattr(parent, child, swapped)
    return converted, kept


def _disagreement(planned: list[str], built: list[str]) -> str:
    only_plan = [n for n in planned if n not in built]
    only_built = [n for n in built if n not in planned]
    parts = []
    if only_plan:
        parts.append(f"the plan converts {_few(only_plan)} which the built model does not")
    if only_built:
        parts.append(f"the built model would convert {_few(only_built)} which the plan does not")
    if not parts:
        parts.append("the same layers in another order")
    return (
        "precision.dtype fp8: the built model's linear layers differ from the plan's "
        f"({'; '.join(parts)}); the plan's layer list does not describe this model"
    )


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def describe(converted: list[str], kept: dict[str, str], fp8: dict[str, Any], device_type: str) -> str:
    """The run's one line: 'fp8: N linear layers converted (tensorwise, emulated on CPU); M kept in bf16'."""
    how = [fp8["scaling"]]
    if device_type != "cuda":
        how.append("emulated on CPU")
    if fp8.get("all_gather"):
        how.append("FSDP2 all-gather in fp8")
    return f"fp8: {len(converted)} linear layers converted ({', '.join(how)}); {len(kept)} kept in bf16"


def after_optimizer_step(model: nn.Module) -> None:
    """With fp8 all-gather: the next step's weight scales of every fp8 layer, one all-reduce
    (torchao's precompute; without it each layer reduces its own amax as it is gathered)."""
    float8 = torchao_float8()
    float8.precompute_float8_dynamic_scale_for_fsdp(model)


def is_float8(module: nn.Module) -> bool:
    """A layer `convert` swapped in."""
    return isinstance(module, _classes()[0])


_CLASSES: list[type[nn.Module]] = []


def _classes() -> tuple[Any, Any]:
    """(Float8Linear, Float8Conv1D), built once torchao is imported."""
    if not _CLASSES:
        _CLASSES.extend(_define())
    return _CLASSES[0], _CLASSES[1]


def _define() -> tuple[type[nn.Module], type[nn.Module]]:
    torchao_float8()
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    class AutocastFloat8Linear(Float8Linear):  # torchao is untyped: its base is Any to mypy
        """torchao's Float8Linear whose input follows autocast on any device.

        torchao casts the input to CUDA autocast's dtype only; under CPU autocast the layer would
        take fp32 inputs and return fp32 where every other matrix product returns bf16.
        """

        def weight_t(self) -> torch.Tensor:
            """The weight laid out (in, out), as the matrix product takes it."""
            return self.weight.t()

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            kind = input.device.type
            if torch.is_autocast_enabled(kind):
                input = input.to(torch.get_autocast_dtype(kind))
            out = matmul_with_hp_or_float8_args.apply(
                input, self.weight_t(), self.linear_mm_config, self.config
            )
            return out if self.bias is None else out + self.bias.to(out.dtype)

    class Float8Conv1D(AutocastFloat8Linear):
        """transformers' Conv1D (y = x @ W + b, W stored (in, out)) computing in fp8 like Float8Linear.

        The weight keeps Conv1D's layout, so the state dict (names and shapes) is the Conv1D's; a
        subclass of torchao's Float8Linear, so torchao's FSDP2 scale precompute and the fp8 x-ray
        see it as one.
        """

        @classmethod
        def from_conv1d(cls, conv: nn.Module, config: Any) -> Float8Conv1D:
            fan_in, fan_out = cast(torch.Tensor, conv.weight).shape
            with torch.device("meta"):
                new = cls(int(fan_in), int(fan_out), bias=False, config=config)
            new.weight = conv.weight
            new.bias = conv.bias
            if config.enable_fsdp_float8_all_gather:
                from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

                new.weight = nn.Parameter(
                    WeightWithDynamicFloat8CastTensor(
                        new.weight, new.linear_mm_config, config.cast_config_weight.target_dtype
                    ),
                    requires_grad=new.weight.requires_grad,
                )
            return new

        def weight_t(self) -> torch.Tensor:
            return self.weight

        def extra_repr(self) -> str:
            return "conv1d (weight in x out), " + super().extra_repr()

    return AutocastFloat8Linear, Float8Conv1D
