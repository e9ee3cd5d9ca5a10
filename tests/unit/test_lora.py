"""LoRA in the planner, without torch: adapters counted on a model directory, frozen weights' bytes
per ZeRO stage and backend, the dry run's line, unmatched targets refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.plan.estimate import memory, state_bytes
from launcher.plan.estimate.state_bytes import Params, model_state_bytes
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.recipe.shapes import Shape
from tests.conftest import RECIPES


def test_the_planner_plans_lora_on_a_model_directory(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher import cli

    assert cli.main(["plan", str(RECIPES / "llama_sft_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    # rank 8 x (in + out) of q, k, v, o (64-64, 64-32, 64-32, 64-64) in each of 2 layers
    assert "LoRA rank 8: 7,168 of 191,040 parameters train" in out
    assert cli.main(["plan", str(RECIPES / "llama_sft_tiny.yaml"), "model.lora.target_modules=[q_prj]"]) == 2
    assert "'q_prj' matches no linear layer" in capsys.readouterr().err


def test_the_planner_names_unmatched_targets() -> None:
    assert state_bytes.lora_unmatched(Shape("bert-mlm", 64, 2, 2, 256, 500, 64), ["query", "q_proj"]) == [
        "q_proj"
    ]
    assert state_bytes.lora_params(Shape("other", 8, 1, 1, 8, 8, 8), 4) is None


def _lora_state(
    stage: int, backend: str = "deepspeed", dtype: str = "bf16", **kw: Any
) -> state_bytes.ModelState:
    base, adapters = Params(1_000_000_000), Params(4_000_000)
    return model_state_bytes(adapters, dtype, backend, stage, 8, frozen=base, **kw)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_weights_are_params_only_under_zero_0_to_2(stage: int) -> None:
    s, full = _lora_state(stage), model_state_bytes(Params(4_000_000), "bf16", "deepspeed", stage, 8)
    # The 16-bit frozen base sits whole on every rank; grads, master and moments are the adapters'.
    assert s.params == 2 * 1_000_000_000 + full.params
    assert (s.grads, s.master, s.optimizer, s.step_buffers) == (
        full.grads, full.master, full.optimizer, full.step_buffers,
    )  # fmt: skip


def test_frozen_weights_are_partitioned_under_zero_3() -> None:
    s = _lora_state(3)
    assert s.params == 2 * (1_000_000_000 + 4_000_000) // 8
    assert (s.grads, s.master, s.optimizer) == (2 * 500_000, 4 * 500_000, 8 * 500_000)
    off = _lora_state(3, offload_params=True, offload_optimizer=True)
    assert off.params == 0
    assert off.cpu == 2 * (1_000_000_000 + 4_000_000) // 8 + (2 + 4 + 8 + 4) * 500_000


def test_frozen_weights_under_accelerate() -> None:
    ddp = _lora_state(0, "accelerate")
    # fp32 parameters (frozen ones too), gradients and DDP buckets for the adapters only.
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.comm_buffers) == (
        4 * 1_004_000_000, 4 * 4_000_000, 8 * 4_000_000, 4 * 4_000_000,
    )  # fmt: skip
    fsdp2 = _lora_state(3, "accelerate")
    # FSDP2: every parameter an fp32 shard, frozen ones too; gradients and moments for the adapters only
    # (FSDP2 reduce-scatters the parameters that have gradients: no flat gradient spans frozen weights).
    assert (fsdp2.params, fsdp2.grads, fsdp2.optimizer) == (4 * 125_500_000, 4 * 500_000, 8 * 500_000)


def test_fp32_frozen_weights_are_4_bytes() -> None:
    assert _lora_state(2, dtype="fp32").params == 4 * 1_004_000_000


BF16_CPU = Hardware(cpu_count=2, cpu_bf16=True)  # precision auto resolves bf16 on it


def _setting(*overrides: str) -> memory.Setting:
    plan = resolve(load(RECIPES / "bert.yaml", overrides), BF16_CPU, keep_machine_problems=True)
    return memory.setting_of(plan)


def test_the_planner_trains_only_the_adapters_of_bert_base() -> None:
    full, lo = _setting(), _setting("model.lora.rank=8")
    assert full.lora is None
    assert lo.lora is not None
    # 12 layers x (query + value) x 8 x (768 + 768)
    assert lo.lora.params.total == 12 * 2 * 8 * (768 + 768) == 294_912
    assert lo.params == full.params  # the base, now frozen
    e_full, e_lora = memory.estimate(full, memory.Config(2)), memory.estimate(lo, memory.Config(2))
    n = lo.lora.params.total
    assert e_lora.state.params == e_full.state.params + 2 * n  # bf16 base + adapters
    assert (e_lora.state.grads, e_lora.state.master, e_lora.state.optimizer) == (2 * n, 4 * n, 8 * n)
    assert e_lora.activations_per_sample is not None
    assert e_full.activations_per_sample is not None
    assert e_lora.activations_per_sample < e_full.activations_per_sample
    assert e_lora.total(32) < e_full.total(32)


def test_the_dry_run_says_what_trains() -> None:
    plan = resolve(
        load(RECIPES / "bert.yaml", ["model.lora.rank=8"]), Hardware(cpu_count=2), keep_machine_problems=True
    )
    line = memory.describe(plan).splitlines()[1]
    # The total depends on the vocabulary: the trained tokenizer's when cached, else its cap.
    total = memory.setting_of(plan).params.total + 294_912
    assert f"LoRA rank 8: 294,912 of {total:,} parameters train ({100 * 294_912 / total:.2f} %)" in line
    assert line.startswith("ZeRO stage 2: ")


def test_the_planner_refuses_a_target_that_matches_nothing() -> None:
    plan = resolve(
        load(RECIPES / "bert.yaml", ["model.lora.rank=8", "model.lora.target_modules=[q_proj]"]),
        Hardware(cpu_count=2),
        keep_machine_problems=True,
    )
    with pytest.raises(memory.UserError, match="'q_proj' matches no linear layer of bert-mlm"):
        memory.setting_of(plan)
    assert "matches no linear layer" in memory.describe(plan)


def test_the_planner_takes_the_adapter_count_as_a_number() -> None:
    plan = resolve(
        load(
            RECIPES / "bert.yaml", ["model.name=null", "model.target=mypkg.models:build", "model.lora.rank=8"]
        ),
        Hardware(cpu_count=2),
        keep_machine_problems=True,
    )
    with pytest.raises(memory.UserError, match="cannot count its adapters"):
        memory.setting_of(plan, num_params=350_000_000)
    setting = memory.setting_of(plan, num_params=350_000_000, num_trainable=1_000_000)
    assert setting.lora is not None
    assert setting.num_params == 351_000_000
    est = memory.estimate(setting, memory.Config(0))
    assert est.state.optimizer == 8 * 1_000_000
