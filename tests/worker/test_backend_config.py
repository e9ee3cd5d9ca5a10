"""The backend configs the plan builds, read back by DeepSpeed's and Accelerate's own parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from tests.backend_recipes import CPU, MATRIX, H100x8, make, valid_offload

ROOT = Path(__file__).resolve().parents[2]


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


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


@pytest.mark.parametrize(("stage", "dtype", "offload"), [m for m in MATRIX if valid_offload(m[0], m[2])])
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


@pytest.mark.parametrize(
    ("stage", "offload", "dtype"), [(1, "none", "bf16"), (3, "both", "fp16"), (2, "none", "fp32")]
)
def test_fsdp2_settings_become_torchs_policies(stage: int, offload: str, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from launcher.worker.backends import fsdp2

    settings = resolve(make("accelerate", stage=stage, offload=offload, dtype=dtype), H100x8).backend_config[
        "fsdp2"
    ]
    got = fsdp2.options(settings)
    assert got["reshard_after_forward"] is (stage == 3)
    assert isinstance(got.get("offload_policy"), CPUOffloadPolicy) is (offload == "both")
    if dtype == "fp32":
        assert "mp_policy" not in got
    else:  # fp32 shards (the master weights), gathered in the 16-bit dtype, gradients reduced in fp32
        want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert got["mp_policy"] == MixedPrecisionPolicy(param_dtype=want, reduce_dtype=torch.float32)
