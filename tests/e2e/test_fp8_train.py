"""precision.dtype fp8 in real 2-rank CPU runs (torchao's float8, emulated): every supported backend
path trains; an fp8 checkpoint holds a bf16 run's keys and shapes; stop and resume equals an
uninterrupted run bit for bit; the export is a plain transformers model whose logits equal a bf16
evaluation of the run's own weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.plan.fp8 import FP8_DEEPSPEED_STAGES
from launcher.plan.resolve import Plan
from launcher.worker import models
from tests.checkpoint_state import _state, assert_bitwise_equal, final_checkpoint
from tests.runs import ROOT, explain, losses, mplaunch

pytestmark = pytest.mark.slow

SHORT = {
    "data.seq_len": 32,
    "model.dropout": 0.1,  # the resumed run must restore the dropout RNG too
    "train.micro_batch_size": 4,
    "train.global_batch_size": 16,
    "train.eval_every": 0,
    "logging.every_steps": 1,
    "logging.progress": "false",
    "logging.tensorboard": "false",
    "scheduler.name": "constant",  # the run's length does not change the learning rate
}
PATHS = [("accelerate", stage) for stage in (0, 1, 2, 3)] + [
    ("deepspeed", stage) for stage in sorted(FP8_DEEPSPEED_STAGES)
]


@pytest.fixture(scope="module", autouse=True)
def _module_env() -> Iterator[None]:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which needs its accelerator named on a CPU.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        yield


def _train(tmp: Path, recipe: str, name: str, *overrides: str, **settings: Any) -> Path:
    """Train recipes/`recipe`.yaml with SHORT, `settings` and `overrides` into tmp/runs/`name`."""
    pairs = {**SHORT, **settings, "logging.dir": str(tmp / "runs"), "name": name}
    args = [f"{k}={v}" for k, v in pairs.items()]
    result = mplaunch(str(ROOT / "recipes" / f"{recipe}.yaml"), *args, *overrides)
    assert result.returncode == 0, explain(result)
    return tmp / "runs" / name


@pytest.mark.parametrize("recipe", ["gpt2_tiny", "bert_tiny"])
@pytest.mark.parametrize(("backend", "stage"), PATHS, ids=lambda v: str(v))
def test_fp8_trains_on_every_supported_path(tmp_path: Path, recipe: str, backend: str, stage: int) -> None:
    layers = {"gpt2_tiny": 6, "bert_tiny": 10}[recipe]  # converted: all but block 0's attention and the head
    kept = {"gpt2_tiny": 3, "bert_tiny": 4}[recipe]
    result = mplaunch(
        str(ROOT / "recipes" / f"{recipe}.yaml"),
        *(f"{k}={v}" for k, v in SHORT.items()),
        f"logging.dir={tmp_path / 'runs'}", "name=fp8", "precision.dtype=fp8", f"backend={backend}",
        f"zero.stage={stage}", "train.max_steps=3", "checkpoint.every_steps=0",
    )  # fmt: skip
    assert result.returncode == 0, explain(result)
    line = (
        f"mplaunch: fp8: {layers} linear layers converted (tensorwise, emulated on CPU); {kept} kept in bf16"
    )
    assert result.stdout.count(line) == 1, result.stdout  # rank 0 says it once
    assert "Failed to load" not in result.stderr + result.stdout  # torchao's import kept quiet
    trained = losses(tmp_path / "runs" / "fp8")
    assert sorted(trained) == [1, 2, 3]
    assert all(math.isfinite(v) for v in trained.values())


# --------------------------------------------------------------------------- checkpoints, resume, export


@dataclass(frozen=True)
class Trio:
    """An fp8 run of 6 steps, the same run stopped at 3 and resumed to 6, and a bf16 run of 6."""

    straight: Path
    resumed: Path
    bf16: Path
    resume_stdout: str


# (recipe, backend, zero.stage): the FSDP2 path and a DeepSpeed stage, each with a family's layers.
CASES = {"fsdp2_gpt2": ("gpt2_tiny", "accelerate", 2), "deepspeed2_bert": ("bert_tiny", "deepspeed", 2)}


@pytest.fixture(scope="module")
def trios(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Trio]:
    done: dict[str, Trio] = {}

    def get(case: str) -> Trio:
        if case not in done:
            recipe, backend, stage = CASES[case]
            tmp = tmp_path_factory.mktemp(case)
            common = {"backend": backend, "zero.stage": stage, "checkpoint.every_steps": 3}
            straight = _train(tmp, recipe, "straight", "train.max_steps=6", "precision.dtype=fp8", **common)
            resumed = _train(tmp, recipe, "resumed", "train.max_steps=3", "precision.dtype=fp8", **common)
            again = mplaunch(
                str(ROOT / "recipes" / f"{recipe}.yaml"),
                *(f"{k}={v}" for k, v in {**SHORT, **common}.items()),
                f"logging.dir={tmp / 'runs'}", "name=resumed", "precision.dtype=fp8", "train.max_steps=6",
            )  # fmt: skip
            assert again.returncode == 0, explain(again)
            bf16 = _train(tmp, recipe, "bf16", "train.max_steps=6", "precision.dtype=bf16", **common)
            done[case] = Trio(straight, resumed, bf16, again.stdout)
        return done[case]

    return get


def _shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _state(checkpoint).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("case", CASES)
def test_an_fp8_checkpoint_holds_the_keys_and_shapes_of_a_bf16_one(
    trios: Callable[[str], Trio], case: str
) -> None:
    trio = trios(case)
    fp8, bf16 = _shapes(final_checkpoint(trio.straight, 6)), _shapes(final_checkpoint(trio.bf16, 6))
    assert fp8 == bf16
    assert any("c_fc" in k or "intermediate" in k for k in fp8)  # converted layers are in it


@pytest.mark.parametrize("case", CASES)
def test_stop_and_resume_of_fp8_equals_an_uninterrupted_run(trios: Callable[[str], Trio], case: str) -> None:
    trio = trios(case)
    assert "resuming from step 3" in trio.resume_stdout
    assert losses(trio.resumed) == losses(trio.straight)
    assert_bitwise_equal(final_checkpoint(trio.resumed, 6), final_checkpoint(trio.straight, 6))
    # fp8 changed the numbers: the same run in bf16 has other losses
    assert losses(trio.bf16) != losses(trio.straight)


@pytest.mark.parametrize("case", CASES)
def test_fp8_export_is_a_plain_model_with_the_logits_of_a_bf16_evaluation(
    trios: Callable[[str], Trio], case: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    trio = trios(case)
    out = tmp_path / "export"
    result = mplaunch("export", str(trio.straight), "--out", str(out))
    assert result.returncode == 0, explain(result)
    assert "fp8 training" in result.stdout
    plan = Plan.from_json((trio.straight / "plan.json").read_text())
    auto = AutoModelForCausalLM if plan.model.causal else AutoModelForMaskedLM
    exported = auto.from_pretrained(str(out)).eval()
    assert not [type(m).__name__ for m in exported.modules() if "Float8" in type(m).__name__]
    reference = models.build(plan.recipe.model, plan.shape).lm
    reference.load_state_dict(
        _run_weights(trio.straight / "checkpoints" / "step-00000006", plan), strict=True
    )
    ids = torch.randint(5, plan.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = exported(input_ids=ids).logits, reference.eval()(input_ids=ids).logits
    assert torch.equal(got, want)


def _run_weights(checkpoint: Path, plan: Plan) -> dict[str, torch.Tensor]:
    """The run's fp32 weights read by a path of its own: FSDP2's DCP shards merged by torch, or
    DeepSpeed's fp32 masters put together by DeepSpeed's zero_to_fp32 (checked against the bf16
    module weights the run held)."""
    state = _state(checkpoint)
    if plan.recipe.backend == "accelerate":
        weights = {k.removeprefix("dcp/model/"): v for k, v in state.items() if k.startswith("dcp/model/")}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed"))
        module = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)[
            "module"
        ]
        for name, held in module.items():
            if name not in weights or not held.is_floating_point():
                continue
            assert held.dtype == torch.bfloat16, name
            assert torch.equal(weights[name].to(held.dtype), held), name
    return {k.removeprefix("lm."): v for k, v in weights.items()}
