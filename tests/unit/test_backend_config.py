"""Backend configuration generated from the recipe, checked by DeepSpeed's and Accelerate's own code."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import UserError
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import Recipe, load, validate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
CPU = Hardware(cpu_count=4)
H100x8 = Hardware(
    gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30) for i in range(8)), cpu_count=64
)
LOSS_SCALE = {"initial": 2.0**12, "window": 250, "hysteresis": 3, "consecutive_hysteresis": True, "min": 2.0}


def make(
    backend: str = "deepspeed", stage: int = 0, dtype: str = "bf16", offload: str = "none", **extra: Any
) -> Recipe:
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"name": "tiny-mlp"},
        "backend": backend,
        "train": {"micro_batch_size": 2, "global_batch_size": 64, "grad_clip": 0.5},
        "precision": {"dtype": dtype, "loss_scale": dict(LOSS_SCALE)},
        "zero": {
            "stage": stage,
            "offload_optimizer": offload in ("optimizer", "both"),
            "offload_params": offload in ("params", "both"),
        },
        **extra,
    }
    return validate(raw, "test")


class _DataParallel:
    """Tells DeepSpeedConfig the data-parallel world size, as an mpu would."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_imported_once() -> Any:
    # Importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK for good; do it
    # before the per-test env-leak check starts watching (accelerate may
    # import it too), with the CPU accelerator chosen.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        try:
            from deepspeed.runtime import config as ds_config
        except ImportError as exc:  # deepspeed is an optional extra
            yield f"deepspeed is not importable: {exc}"
        else:
            yield ds_config


@pytest.fixture
def ds_parse(monkeypatch: pytest.MonkeyPatch, _deepspeed_imported_once: Any) -> Any:
    """DeepSpeed's own config parser, for a plan's world size."""
    if isinstance(_deepspeed_imported_once, str):
        pytest.skip(_deepspeed_imported_once)
    ds_config = _deepspeed_imported_once
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # Outside a process group DeepSpeedConfig assumes world size 1; give it the plan's.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)

    def parse(plan: Plan) -> Any:
        return ds_config.DeepSpeedConfig(plan.backend_config, mpu=_DataParallel(plan.world_size))

    return parse


# --------------------------------------------------------------------------- DeepSpeed

MATRIX = list(
    itertools.product([0, 1, 2, 3], ["fp16", "bf16", "fp32"], ["none", "optimizer", "params", "both"])
)


def _valid(stage: int, offload: str) -> bool:
    return (offload in ("none",) or stage >= 1) and (offload not in ("params", "both") or stage == 3)


@pytest.mark.parametrize(("stage", "dtype", "offload"), [m for m in MATRIX if _valid(m[0], m[2])])
def test_deepspeed_reads_back_what_the_recipe_says(
    ds_parse: Any, stage: int, dtype: str, offload: str
) -> None:
    plan = resolve(make(stage=stage, dtype=dtype, offload=offload), H100x8)
    c = ds_parse(plan)
    assert c.zero_optimization_stage == stage
    assert c.float16_config.enabled is (dtype == "fp16")
    assert c.bfloat16_config.enabled is (dtype == "bf16")
    if dtype == "fp16":  # the loss-scale knobs are written only where they act
        assert c.float16_config.loss_scale == 0  # dynamic
        assert c.float16_config.initial_scale_power == 12
        assert c.float16_config.loss_scale_window == 250
        assert c.float16_config.hysteresis == 3
        assert c.float16_config.consecutive_hysteresis is True
        assert c.float16_config.min_loss_scale == 2
    else:
        assert plan.backend_config["fp16"] == {"enabled": False}
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (64, 2, 4)
    assert c.gradient_clipping == 0.5
    offloaded_optimizer = c.zero_config.offload_optimizer
    offloaded_params = c.zero_config.offload_param
    assert (offloaded_optimizer is not None and offloaded_optimizer.device == "cpu") is (
        offload in ("optimizer", "both")
    )
    assert (offloaded_params is not None and offloaded_params.device == "cpu") is (
        offload in ("params", "both")
    )


@pytest.mark.parametrize(
    ("stage", "offload"), sorted({(m[0], m[2]) for m in MATRIX if not _valid(m[0], m[2])})
)
def test_offload_combinations_deepspeed_would_ignore_are_refused(stage: int, offload: str) -> None:
    with pytest.raises(UserError, match=r"zero\.offload_(optimizer|params): needs zero\.stage"):
        make(stage=stage, offload=offload)


def test_static_loss_scale_reaches_deepspeed(ds_parse: Any) -> None:
    r = make(dtype="fp16", precision={"dtype": "fp16", "loss_scale": {"dynamic": False, "initial": 1000.0}})
    c = ds_parse(resolve(r, H100x8))
    assert c.float16_config.loss_scale == 1000.0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("hw", [CPU, H100x8], ids=["cpu", "8xH100"])
def test_every_shipped_recipe_passes_deepspeeds_parser(ds_parse: Any, path: Path, hw: Hardware) -> None:
    plan = resolve(load(path, ["backend=deepspeed"]), hw)
    c = ds_parse(plan)
    assert c.train_batch_size == plan.batch.global_batch_size
    assert c.zero_optimization_stage == plan.recipe.zero.stage


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
    ("stage", "offload", "hw", "strategy"),
    [
        (0, "none", H100x8, None),
        (1, "none", H100x8, "SHARD_GRAD_OP"),
        (2, "none", H100x8, "SHARD_GRAD_OP"),
        (3, "none", H100x8, "FULL_SHARD"),
        (3, "both", H100x8, "FULL_SHARD"),
        (3, "none", CPU, None),  # no FSDP on CPU: plain DDP, with a warning
    ],
)
def test_accelerate_sharding_follows_zero_stage(
    stage: int, offload: str, hw: Hardware, strategy: str | None
) -> None:
    s = resolve(make("accelerate", stage=stage, offload=offload), hw).backend_config
    if strategy is None:
        assert s["fsdp_plugin"] is None
    else:
        assert s["fsdp_plugin"] == {
            "sharding_strategy": strategy,
            "cpu_offload": offload == "both",
            "use_orig_params": True,
            "auto_wrap_policy": "transformer_based_wrap",
            "state_dict_type": "SHARDED_STATE_DICT",
            "mixed_precision_policy": "bf16",
        }


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


@pytest.mark.parametrize(
    ("stage", "offload", "dtype"), [(1, "none", "bf16"), (3, "both", "fp16"), (2, "none", "fp32")]
)
def test_fsdp_settings_are_accepted_by_accelerate(stage: int, offload: str, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    accelerate_utils = pytest.importorskip("accelerate.utils")
    fsdp = resolve(make("accelerate", stage=stage, offload=offload, dtype=dtype), H100x8).backend_config[
        "fsdp_plugin"
    ]
    plugin = accelerate_utils.FullyShardedDataParallelPlugin(**fsdp)
    assert plugin.sharding_strategy.name == fsdp["sharding_strategy"]
    assert plugin.cpu_offload.offload_params is fsdp["cpu_offload"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    if dtype == "fp32":
        assert plugin.mixed_precision_policy is None
    else:  # fp32 shards (the master weights), gathered and reduced in the 16-bit dtype
        want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert plugin.mixed_precision_policy.param_dtype == want
        assert plugin.mixed_precision_policy.reduce_dtype == want
