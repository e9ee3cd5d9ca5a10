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
from tests.one_rank import one_rank_world

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


@pytest.fixture(scope="module")
def one_rank() -> Any:
    """A 1-rank gloo process group: FSDP2 (zero.stage 1-3 on accelerate) shards over it."""
    with one_rank_world(engines=False):
        yield


def _fsdp2_seen(calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The fsdp2 settings, but `wrap`, that the fully_shard calls were given (the same for each)."""
    if not calls:
        return None
    kwargs = [dict(k) for _, k in calls]
    for k in kwargs:
        k.pop("mesh")
    assert all(k == kwargs[0] for k in kwargs), kwargs
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    policy = kwargs[0].get("mp_policy")
    return {
        "reshard_after_forward": kwargs[0]["reshard_after_forward"],
        "param_dtype": names[policy.param_dtype] if policy else "fp32",
        "reduce_dtype": names[policy.reduce_dtype] if policy else "fp32",
        "offload_params": "offload_policy" in kwargs[0],
    }


def accelerate_arguments(
    plan: Plan, monkeypatch: pytest.MonkeyPatch, build: bool, model: nn.Module | None = None
) -> dict[str, Any]:
    """What the accelerate engine handed to Accelerate and torch, in the dry run's layout (the
    fsdp2 settings without `wrap`; `units` lists the class of each module fully_shard was given)."""
    import accelerate
    import torch.distributed.fsdp as fsdp

    from launcher.worker.backends import accelerate as acc_backend

    seen: dict[str, Any] = {}
    calls: list[tuple[str, dict[str, Any]]] = []
    real_init, real_shard = accelerate.Accelerator.__init__, fsdp.fully_shard

    def accelerator_spy(self: Any, **kwargs: Any) -> None:
        seen["accelerator"] = dict(kwargs)
        if not build:
            raise Captured
        real_init(self, **kwargs)

    def shard_spy(module: nn.Module, **kwargs: Any) -> Any:
        calls.append((type(module).__name__, kwargs))
        return real_shard(module, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", accelerator_spy)
    monkeypatch.setattr(fsdp, "fully_shard", shard_spy)
    if not build:
        with pytest.raises(Captured):
            acc_backend.Engine(plan, model or tiny_model())
        return seen
    engine = acc_backend.Engine(plan, model or tiny_model())
    opt = engine.torch_optimizer()
    rule = engine.scaler.rule if engine.scaler is not None else None
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {
        **seen,
        "fsdp2": _fsdp2_seen(calls),
        "units": [name for name, _ in calls],
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
            "type": type(opt).__name__,
            "lr": opt.defaults["lr"],
            "betas": list(opt.defaults["betas"]),
            "eps": opt.defaults["eps"],
            "weight_decay": opt.param_groups[0]["weight_decay"],
            "fused": bool(opt.defaults["fused"]),
        },
    }


def _without_wrap(printed: dict[str, Any]) -> dict[str, Any]:
    fsdp2 = printed["fsdp2"]
    return {**printed, "fsdp2": None if fsdp2 is None else {k: v for k, v in fsdp2.items() if k != "wrap"}}


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_accelerate_engine_gets_the_printed_settings(
    recipe: Path,
    dtype: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_rank: None,
) -> None:
    overrides = ("backend=accelerate", f"precision.dtype={dtype}", "precision.loss_scale.window=123")
    printed, plan = printed_config(capsys, recipe, *overrides)
    before = dict(os.environ)
    try:
        got = accelerate_arguments(plan, monkeypatch, build=True)
    finally:  # Accelerate and torch write their choices into the environment; give it back
        os.environ.clear()
        os.environ.update(before)
    units = got.pop("units")
    assert got == _without_wrap(printed)
    # tiny_model has no transformer blocks: the root alone, at every zero stage but 0 (DDP).
    assert units == ([] if printed["fsdp2"] is None else ["Sequential"])


@pytest.mark.parametrize(("stage", "dtype"), [(1, "bf16"), (3, "fp16"), (2, "fp32")])
def test_fsdp2_shards_the_printed_units_with_the_printed_policy(
    stage: int,
    dtype: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_rank: None,
) -> None:
    from launcher.worker.model_setup import model_for

    overrides = ("backend=accelerate", f"zero.stage={stage}", f"precision.dtype={dtype}", "model.size=tiny")
    printed, plan = printed_config(capsys, ROOT / "recipes" / "bert_tiny.yaml", *overrides)
    before = dict(os.environ)
    try:
        got = accelerate_arguments(plan, monkeypatch, build=True, model=model_for(plan)[0])
    finally:
        os.environ.clear()
        os.environ.update(before)
    assert printed["fsdp2"]["wrap"] == "each BertLayer, then the root"
    assert got["units"] == ["BertLayer"] * plan.shape.num_layers + ["LMLoss"]
    assert got["fsdp2"] == _without_wrap(printed)["fsdp2"]
    assert got["fsdp2"]["reshard_after_forward"] is (stage == 3)


def test_accelerate_on_gpus_gets_the_printed_accelerator_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load(
        ROOT / "recipes" / "bert_tiny.yaml",
        ["backend=accelerate", "zero.stage=3", "launch.device=cuda", "precision.dtype=bf16"],
    )
    plan = resolve(recipe, H100x2)
    got = accelerate_arguments(plan, monkeypatch, build=False)
    printed = json.loads(plan.describe().split(HEADERS["accelerate"] + "\n", 1)[1].split("\n== ", 1)[0])
    assert got["accelerator"] == printed["accelerator"] == {"mixed_precision": "no", "cpu": False}
    assert printed["fsdp2"] == {
        "reshard_after_forward": True,
        "param_dtype": "bf16",
        "reduce_dtype": "fp32",
        "offload_params": False,
        "wrap": "each BertLayer, then the root",
    }
