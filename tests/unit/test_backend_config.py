"""Backend configuration generated from the recipe, checked by DeepSpeed's and Accelerate's own code."""

from __future__ import annotations

import pytest

from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from tests.backend_recipes import CPU, LOSS_SCALE, MATRIX, H100x8, make, valid_offload

# --------------------------------------------------------------------------- DeepSpeed


@pytest.mark.parametrize(
    ("stage", "offload"), sorted({(m[0], m[2]) for m in MATRIX if not valid_offload(m[0], m[2])})
)
def test_offload_combinations_deepspeed_would_ignore_are_refused(stage: int, offload: str) -> None:
    with pytest.raises(UserError, match=r"zero\.offload_(optimizer|params): needs zero\.stage"):
        make(stage=stage, offload=offload)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_fp16_and_bf16_are_never_both_on(dtype: str) -> None:
    cfg = resolve(make(dtype=dtype), H100x8).backend_config
    assert not (cfg["fp16"]["enabled"] and cfg["bf16"]["enabled"])
    assert cfg["fp16"]["enabled"] is (dtype == "fp16")
    assert cfg["bf16"]["enabled"] is (dtype == "bf16")


def test_deepspeed_optimizer_follows_the_device_and_offload() -> None:
    cpu = resolve(make(), CPU).backend_config["optimizer"]["params"]
    gpu = resolve(make(), H100x8).backend_config["optimizer"]["params"]
    offload = resolve(make(stage=2, offload="optimizer"), H100x8).backend_config
    assert cpu["torch_adam"] is True
    assert "fused" not in cpu
    assert gpu["torch_adam"] is True
    assert gpu["fused"] is True
    # ZeRO-Offload needs DeepSpeed's CPU Adam: no torch_adam there.
    assert "torch_adam" not in offload["optimizer"]["params"]
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_min_loss_scale_is_written_as_an_int() -> None:
    fp16 = resolve(make(dtype="fp16"), H100x8).backend_config["fp16"]
    assert fp16["min_loss_scale"] == 2
    assert isinstance(fp16["min_loss_scale"], int)


# --------------------------------------------------------------------------- Accelerate


@pytest.mark.parametrize(
    ("stage", "offload", "hw", "dtype", "reshard"),
    [
        (1, "none", H100x8, "bf16", False),  # FSDP2 has no optimizer-only mode: as stage 2
        (2, "none", H100x8, "fp16", False),
        (3, "none", H100x8, "bf16", True),
        (3, "both", H100x8, "bf16", True),
        (2, "none", CPU, "fp32", False),  # FSDP2 on CPU too (gloo)
        (3, "none", CPU, "bf16", True),
        (3, "both", CPU, "fp32", True),  # nothing to offload to on CPU (the plan warns)
    ],
)
def test_accelerate_zero_stages_are_fsdp2_on_every_device(
    stage: int, offload: str, hw: Hardware, dtype: str, reshard: bool
) -> None:
    s = resolve(make("accelerate", stage=stage, offload=offload, dtype=dtype), hw).backend_config
    assert s["fsdp2"] == {
        "reshard_after_forward": reshard,
        "param_dtype": dtype,  # fp32: no mixed-precision policy
        "reduce_dtype": "fp32",
        "offload_params": offload == "both" and hw is H100x8,
        "wrap": "the root alone (tiny-mlp has no transformer blocks)",
    }
    assert "fsdp_plugin" not in s


@pytest.mark.parametrize("hw", [CPU, H100x8])
def test_accelerate_stage_0_is_ddp(hw: Hardware) -> None:
    assert resolve(make("accelerate", stage=0), hw).backend_config["fsdp2"] is None


@pytest.mark.parametrize(
    ("model", "wrap"),
    [
        ({"name": "bert-mlm"}, "each BertLayer, then the root"),
        ({"name": "gpt2-lm"}, "each GPT2Block, then the root"),
        (
            {"name": None, "target": "tests.user_code:build"},
            "each module whose class is in the model's _no_split_modules (none listed: each transformers "
            "GradientCheckpointingLayer) but one sharing a weight with a module outside it, then the root; "
            "the root alone if there are none",
        ),
    ],
)
def test_fsdp2_units_are_named_as_the_worker_applies_them(model: dict, wrap: str) -> None:
    s = resolve(make("accelerate", stage=3, model=model), CPU).backend_config
    assert s["fsdp2"]["wrap"] == wrap


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_accelerate_autocast_and_loss_scale_have_one_owner(dtype: str) -> None:
    s = resolve(make("accelerate", dtype=dtype), H100x8).backend_config
    # mplaunch autocasts and scales; the Accelerator must not do either a second time.
    assert s["accelerator"] == {"mixed_precision": "no", "cpu": False}
    assert s["autocast"] == (None if dtype == "fp32" else dtype)
    assert (s["grad_accum"], s["grad_clip"]) == (4, 0.5)
    expected = {"dynamic": True, "initial": 4096.0, **{k: v for k, v in LOSS_SCALE.items() if k != "initial"}}
    assert s["loss_scale"] == (expected if dtype == "fp16" else None)


def test_loss_scale_settings_drive_the_accelerate_scaler() -> None:
    from launcher.plan.loss_scale import DynamicScale
    from launcher.recipe.schema import LossScale

    s = resolve(make("accelerate", dtype="fp16"), H100x8).backend_config["loss_scale"]
    rule = DynamicScale.from_recipe(LossScale(**s))
    assert (rule.scale, rule.window, rule.hysteresis, rule.min_scale) == (4096.0, 250, 3, 2.0)
    assert rule.consecutive_hysteresis is True
