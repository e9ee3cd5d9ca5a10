"""launcher.worker.precision: the one dtype map, and the Precision object built from the plan's policy
(autocast, the fp16 loss scaler and its checkpoint state), in one process on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from launcher.plan.loss_scale import DynamicScale, ScaleAtMinimum
from launcher.plan.precision import DTYPE_BYTES, PrecisionPolicy
from launcher.recipe.schema import LossScale
from launcher.worker import precision, xray
from launcher.worker.precision import DTYPES, Precision


def _policy(dtype: str, **scale: float) -> PrecisionPolicy:
    loss_scale = LossScale(**scale) if dtype == "fp16" else None
    return PrecisionPolicy(dtype, "set in the test", True, loss_scale, True)  # type: ignore[arg-type]


def test_one_dtype_map_for_the_one_vocabulary() -> None:
    assert DTYPES.keys() == DTYPE_BYTES.keys() == {"fp32", "bf16", "fp16"}
    assert all(DTYPES[name].itemsize == width for name, width in DTYPE_BYTES.items())
    assert xray.DTYPES is precision.DTYPES  # the x-ray reads the same map


@pytest.mark.parametrize(
    ("dtype", "autocast", "scaled"),
    [("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_the_policy_decides_autocast_and_the_scaler(
    dtype: str, autocast: torch.dtype | None, scaled: bool
) -> None:
    p = Precision(_policy(dtype), "cpu")
    assert p.autocast_dtype == autocast
    assert (p.scaler is not None) is scaled
    assert (p.loss_scale() is not None) is scaled
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with p.autocast():
        out = a @ b
    assert out.dtype == (autocast or torch.float32)


def _step(
    p: Precision, model: nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor, spike: bool
) -> bool | None:
    loss = model(x).pow(2).mean()
    p.scale(loss).backward()
    if spike:  # an fp16 overflow, as the scaler's inf check sees it
        assert model.weight.grad is not None
        model.weight.grad[0, 0] = math.inf
    p.unscale_(opt)
    skipped = p.step(opt)
    opt.zero_grad(set_to_none=True)
    return skipped


def _setup(seed: int = 0) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


SPIKES = [False, True, False, True, True, False, False, False, True, False]


def test_fp16_skips_overflowing_steps_and_the_scale_follows_deepspeeds_rules() -> None:
    p = Precision(_policy("fp16", initial=2.0**10, hysteresis=2, window=3), "cpu")
    rule = DynamicScale.from_recipe(LossScale(initial=2.0**10, hysteresis=2, window=3))
    model, opt = _setup()
    x = torch.randn(16, 8)
    for spike in SPIKES:
        before = model.weight.detach().clone()
        skipped = _step(p, model, opt, x, spike)
        rule.update(spike)
        assert skipped is spike
        assert torch.equal(before, model.weight) is spike  # a skipped step moves no weight
        assert p.loss_scale() == rule.scale


def test_without_fp16_nothing_is_skipped_or_scaled() -> None:
    p = Precision(_policy("bf16"), "cpu")
    model, opt = _setup()
    assert _step(p, model, opt, torch.randn(16, 8), spike=False) is None
    assert p.state_dict() is None
    p.load_state_dict(None)  # nothing to restore


def test_the_scaler_state_resumes_bitwise_through_json() -> None:
    policy = _policy("fp16", initial=2.0**10, hysteresis=2, window=2)
    x = torch.randn(16, 8)
    straight = Precision(policy, "cpu")
    model, opt = _setup()
    for spike in SPIKES:
        _step(straight, model, opt, x, spike)

    first = Precision(policy, "cpu")
    model2, opt2 = _setup()
    for spike in SPIKES[:5]:
        _step(first, model2, opt2, x, spike)
    state = first.state_dict()
    assert state is not None
    # The keys a checkpoint holds (mplaunch_accelerate.json's "scale") are DynamicScale's fields.
    assert set(state) == {f.name for f in fields(DynamicScale)}
    resumed = Precision(policy, "cpu")
    resumed.load_state_dict(json.loads(json.dumps(state)))
    model3 = copy.deepcopy(model2)
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    opt3.load_state_dict(opt2.state_dict())
    for spike in SPIKES[5:]:
        _step(resumed, model3, opt3, x, spike)
    assert resumed.loss_scale() == straight.loss_scale()
    assert resumed.state_dict() == straight.state_dict()
    assert torch.equal(model3.weight, model.weight)
    assert torch.equal(model3.bias, model.bias)


def test_an_overflow_at_the_minimum_scale_raises() -> None:
    p = Precision(_policy("fp16", initial=4.0, min=2.0, hysteresis=1), "cpu")
    model, opt = _setup()
    x = torch.randn(16, 8)
    assert _step(p, model, opt, x, spike=True) is True
    assert p.loss_scale() == 2.0
    with pytest.raises(ScaleAtMinimum):
        _step(p, model, opt, x, spike=True)
