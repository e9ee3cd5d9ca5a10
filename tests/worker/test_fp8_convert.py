"""precision.dtype fp8's conversion (launcher.worker.fp8) on tiny built models, emulated on the CPU:
the plan's layers and only those become fp8 layers, GPT-2's Conv1D keeps its weight layout (and so
the state dict), the fp8 products are close to the plain ones, and forward and backward run."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from launcher.plan import fp8_layers  # noqa: E402
from launcher.recipe.schema import Model  # noqa: E402
from launcher.recipe.shapes import Shape, linear_layers  # noqa: E402
from launcher.worker import fp8, models  # noqa: E402
from launcher.worker.models import ModelError  # noqa: E402
from launcher.worker.precision import Precision  # noqa: E402
from tests.plans import make_plan  # noqa: E402

VOCAB = 512
FAMILIES = ("gpt2-lm", "bert-mlm")


def _shape(family: str) -> Shape:
    return Shape(family, 64, 2, 2, 256, VOCAB, 64)


def _built(family: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build(Model(name=family, size="tiny", dropout=0.0), _shape(family))  # type: ignore[arg-type]


def _settings(
    family: str | None = None, scaling: str = "tensorwise", keep: list[str] | None = None
) -> dict[str, Any]:
    """The plan's precision.fp8 dict; `converted` chosen from the family's planned layers (None: the worker's)."""
    converted = None
    if family is not None:
        converted, _ = fp8_layers.choose(linear_layers(_shape(family)) or [], True, keep or [])
    return {"scaling": scaling, "keep_first_last": True, "keep": keep or [], "converted": converted,
            "kept": {}, "emulated": True, "all_gather": False}  # fmt: skip


def _float8_names(model: nn.Module) -> list[str]:
    return [name for name, m in fp8.layers_root(model).named_modules() if fp8.is_float8(m)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_built_models_layers_are_the_plans(family: str) -> None:
    assert fp8.linear_layers(fp8.layers_root(_built(family))) == linear_layers(_shape(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_the_plans_layers_are_converted(family: str) -> None:
    model = _built(family)
    settings = _settings(family, keep=["mlp.c_proj", "output.dense"])
    converted, kept = fp8.convert(model, settings, "cpu")
    assert converted == settings["converted"] == _float8_names(model)
    assert converted  # the tiny models have layers to convert
    root = fp8.layers_root(model)
    plain = [n for n, _, _ in fp8.linear_layers(root) if not fp8.is_float8(root.get_submodule(n))]
    assert plain == list(kept)  # the rest stay nn.Linear / Conv1D
    assert all(not n.endswith(("mlp.c_proj", "output.dense")) for n in converted)
    assert kept.get("lm_head", kept.get("cls.predictions.decoder")) == fp8_layers.LAST


def test_a_plan_that_lists_other_layers_is_refused_naming_them() -> None:
    settings = _settings("gpt2-lm")
    settings["converted"] = [*settings["converted"][1:], "transformer.h.9.mlp.c_fc"]
    with pytest.raises(ModelError) as err:
        fp8.convert(_built("gpt2-lm"), settings, "cpu")
    message = str(err.value)
    assert "the plan converts transformer.h.9.mlp.c_fc which the built model does not" in message
    assert "the built model would convert transformer.h.0.mlp.c_fc which the plan does not" in message


def test_without_a_planned_list_the_worker_chooses_by_the_same_rule() -> None:
    model = _built("bert-mlm")
    converted, _ = fp8.convert(model, _settings(None), "cpu")
    assert converted == _settings("bert-mlm")["converted"]


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_shapes_and_values_stay_the_models(family: str) -> None:
    model = _built(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8.convert(model, _settings(family), "cpu")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    fresh = _built(family)
    fresh.load_state_dict(after, strict=True)  # a plain model loads the converted one's state


def _conv1d_pair(scaling: str) -> tuple[nn.Module, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # Conv1D(nf=out, nx=in): weight (64, 96)
    nn.init.normal_(conv.bias, std=0.1)
    parent = nn.Sequential(conv)
    reference = nn.Sequential(Conv1D(96, 64))
    reference.load_state_dict(parent.state_dict())
    settings = _settings(None, scaling)
    settings["keep_first_last"] = False
    fp8.convert(parent, settings, "cpu")
    return parent, reference


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_float8_conv1d_is_the_conv1d_within_fp8_error(scaling: str) -> None:
    converted, reference = _conv1d_pair(scaling)
    layer = converted[0]
    assert type(layer).__name__ == "Float8Conv1D"
    assert tuple(layer.weight.shape) == (64, 96)
    assert converted.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 5, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = converted(x1), reference(x2)
    assert got.shape == want.shape == (3, 5, 96)
    # e4m3 keeps 3 mantissa bits: each product term is off by up to ~2 x 2^-4; the sum's error is far below its size
    rel = (got - want).norm() / want.norm()
    assert 1e-4 < rel < 0.1  # fp8, not a plain product, and close to it
    got.square().sum().backward()
    want.square().sum().backward()
    grad, ref_grad = layer.weight.grad, reference[0].weight.grad
    assert grad.shape == ref_grad.shape == (64, 96)
    assert (grad - ref_grad).norm() / ref_grad.norm() < 0.15
    assert (x1.grad - x2.grad).norm() / x2.grad.norm() < 0.15
    assert (layer.bias.grad - reference[0].bias.grad).norm() / reference[0].bias.grad.norm() < 0.15


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_under_bf16_autocast(family: str) -> None:
    model = _built(family)
    converted, _ = fp8.convert(model, _settings(family), "cpu")
    precision = Precision(_fp8_policy(), "cpu")
    outputs: dict[str, torch.dtype] = {}
    first = fp8.layers_root(model).get_submodule(converted[0])
    first.register_forward_hook(lambda m, a, out: outputs.update(dtype=out.dtype))
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with precision.autocast():
        loss = model(input_ids=ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert outputs["dtype"] == torch.bfloat16  # the fp8 layer's output follows CPU autocast
    for name in converted:
        weight = fp8.layers_root(model).get_submodule(name).weight
        assert weight.dtype == torch.float32
        assert weight.grad is not None
        assert bool(weight.grad.abs().sum() > 0)


def _cpu() -> Any:
    from launcher.plan.hardware import Hardware

    return Hardware(gpus=(), cpu_count=2)


def _fp8_policy() -> Any:
    from dataclasses import replace

    return replace(make_plan("bf16", hardware=_cpu()).precision, dtype="fp8", fp8=_settings(None))


def test_fp8_autocasts_to_bf16() -> None:
    assert Precision(_fp8_policy(), "cpu").autocast_dtype == torch.bfloat16


def test_the_config_follows_the_scaling_and_the_device() -> None:
    from torchao.float8.config import ScalingGranularity

    tensorwise = fp8.float8_config(_settings(None), "cpu")
    rowwise = fp8.float8_config(_settings(None, "rowwise"), "cuda")
    assert tensorwise.emulate
    assert not rowwise.emulate
    assert tensorwise.cast_config_input.scaling_granularity == ScalingGranularity.TENSORWISE
    assert rowwise.cast_config_input.scaling_granularity == ScalingGranularity.AXISWISE
    assert not tensorwise.enable_fsdp_float8_all_gather
    assert fp8.float8_config({**_settings(None), "all_gather": True}, "cuda").enable_fsdp_float8_all_gather


def test_describe_is_the_runs_one_line() -> None:
    settings = _settings(None)
    assert (
        fp8.describe(["a", "b"], {"c": "x"}, settings, "cpu")
        == "fp8: 2 linear layers converted (tensorwise, emulated on CPU); 1 kept in bf16"
    )
    assert (
        fp8.describe(["a"], {}, {**settings, "all_gather": True}, "cuda")
        == "fp8: 1 linear layers converted (tensorwise, FSDP2 all-gather in fp8); 0 kept in bf16"
    )


def test_importing_torchao_says_nothing() -> None:
    code = "from launcher.worker import fp8; fp8.torchao_float8(); import transformers.modeling_utils"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout + out.stderr == ""
