"""What `--dry-run` prints for a backend is exactly what its engine is built from.

Each test prints a dry run through the CLI, as a user would, then builds the
engine from the same plan with the library entry points replaced by spies,
and compares what the engine handed over with what was printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from launcher import cli
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.run import start

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
H100x2 = Hardware(
    gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30) for i in range(2)), cpu_count=16
)
HEADERS = {"deepspeed": "== DeepSpeed config ==", "accelerate": "== Accelerate settings =="}


class Captured(Exception):
    """Raised by a spy once it has what the engine passed; stops the real construction."""


def printed_config(
    capsys: pytest.CaptureFixture[str], recipe: Path, *overrides: str
) -> tuple[dict[str, Any], Plan]:
    """The backend section of a dry run's output, parsed, and the plan the dry run printed."""
    assert cli.main([str(recipe), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    backend = next(o.split("=", 1)[1] for o in overrides if o.startswith("backend="))
    body = out.split(HEADERS[backend] + "\n", 1)[1]
    section = body.split("\n== ", 1)[0]
    plan = start.plan_recipe(recipe, list(overrides))
    return json.loads(section), plan


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))


@pytest.fixture(scope="module", autouse=True)
def _libraries_imported_once() -> Any:
    # Importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK for good: import it (with the CPU
    # accelerator chosen) and accelerate before the per-test env-leak check starts watching.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        import accelerate  # noqa: F401
        import deepspeed  # noqa: F401

        yield


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_deepspeed_engine_gets_the_printed_config(
    recipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepspeed

    from launcher.worker.backends import deepspeed as ds_backend

    printed, plan = printed_config(capsys, recipe, "backend=deepspeed")
    seen: dict[str, Any] = {}

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(deepspeed, "initialize", spy)
    with pytest.raises(Captured):
        ds_backend.Engine(plan, tiny_model())
    assert seen["config"] == printed


def accelerate_arguments(plan: Plan, monkeypatch: pytest.MonkeyPatch, build: bool) -> dict[str, Any]:
    """What the accelerate engine handed to Accelerate and torch, in the dry run's layout."""
    import accelerate

    from launcher.worker.backends import accelerate as acc_backend

    seen: dict[str, Any] = {}
    real_init = accelerate.Accelerator.__init__

    def accelerator_spy(self: Any, **kwargs: Any) -> None:
        plugin = kwargs.pop("fsdp_plugin")
        seen["accelerator"] = dict(kwargs)
        seen["fsdp_plugin"] = None if plugin is None else seen.pop("plugin_kwargs")
        if not build:
            raise Captured
        real_init(self, **kwargs, fsdp_plugin=plugin)

    def plugin_spy(**kwargs: Any) -> object:
        seen["plugin_kwargs"] = dict(kwargs)
        return object()

    monkeypatch.setattr(accelerate.Accelerator, "__init__", accelerator_spy)
    monkeypatch.setattr(accelerate, "FullyShardedDataParallelPlugin", plugin_spy)
    if not build:
        with pytest.raises(Captured):
            acc_backend.Engine(plan, tiny_model())
        return seen
    engine = acc_backend.Engine(plan, tiny_model())
    opt = engine.optimizer.optimizer.defaults
    rule = engine.scaler.rule if engine.scaler is not None else None
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {
        **seen,
        "autocast": names[engine.dtype] if engine.dtype is not None else None,
        "loss_scale": None
        if rule is None
        else {
            "dynamic": rule.dynamic,
            "initial": rule.scale,
            "window": rule.window,
            "hysteresis": rule.hysteresis,
            "consecutive_hysteresis": rule.consecutive_hysteresis,
            "min": rule.min_scale,
        },
        "grad_accum": engine.accum,
        "grad_clip": engine.clip,
        "optimizer": {
            "type": type(engine.optimizer.optimizer).__name__,
            "lr": opt["lr"],
            "betas": list(opt["betas"]),
            "eps": opt["eps"],
            "weight_decay": engine.optimizer.optimizer.param_groups[0]["weight_decay"],
            "fused": bool(opt["fused"]),
        },
    }


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_accelerate_engine_gets_the_printed_settings(
    recipe: Path, dtype: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ("backend=accelerate", f"precision.dtype={dtype}", "precision.loss_scale.window=123")
    printed, plan = printed_config(capsys, recipe, *overrides)
    before = dict(os.environ)
    try:
        got = accelerate_arguments(plan, monkeypatch, build=True)
    finally:  # Accelerate and torch write their choices into the environment; give it back
        os.environ.clear()
        os.environ.update(before)
    assert got == printed


@pytest.mark.parametrize("stage", [1, 3])
def test_accelerate_fsdp_plugin_gets_the_printed_arguments(
    stage: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP is planned only for GPUs: resolve for two H100s and stop at the Accelerator.
    recipe = load(
        ROOT / "recipes" / "bert_tiny.yaml",
        ["backend=accelerate", f"zero.stage={stage}", "launch.device=cuda", "precision.dtype=bf16"],
    )
    plan = resolve(recipe, H100x2)
    got = accelerate_arguments(plan, monkeypatch, build=False)
    printed = json.loads(plan.describe().split(HEADERS["accelerate"] + "\n", 1)[1].split("\n== ", 1)[0])
    assert got["fsdp_plugin"] == printed["fsdp_plugin"]
    assert got["fsdp_plugin"]["mixed_precision_policy"] == "bf16"
    assert got["accelerator"] == printed["accelerator"] == {"mixed_precision": "no", "cpu": False}
