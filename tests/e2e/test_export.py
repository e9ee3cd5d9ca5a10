"""`mplaunch export`: real 2-rank CPU runs exported as a user would, then loaded with transformers.

Each run trains STEPS steps (checkpoints at steps 2 and 4) and is exported once, in a
module-scoped fixture that the tests share. The exported weights are checked against the
checkpoint's own weights, read by a path independent of the export: DeepSpeed ZeRO-2's module
state, ZeRO-3's fp32 shards put together by hand, Accelerate's model file, and for a bf16 run
the bf16 module weights the run held (the fp32 export must round to exactly those).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.errors import UserError
from launcher.plan.resolve import Plan
from launcher.worker import models
from launcher.worker.backends import deepspeed as ds_backend
from tests.runs import FAST, explain, mplaunch, write_recipe

STEPS = 4
EXPORTABLE = {"train": {"max_steps": STEPS}, "checkpoint": {"every_steps": 2, "keep": 3}}
DS = "checkpoints/step-{step:08d}/deepspeed"


@dataclass(frozen=True)
class Exported:
    run_dir: Path
    out: Path
    plan: Plan
    stdout: str

    def ds_file(self, name: str, step: int = STEPS) -> Path:
        return self.run_dir / DS.format(step=step) / name


Runs = Callable[[str], Exported]  # the `runs` fixture: a run of RUNS by name, trained and exported


@pytest.fixture(scope="module", autouse=True)
def _module_env() -> Iterator[None]:
    # torch.load of a DeepSpeed checkpoint imports deepspeed, which needs its accelerator named on a
    # CPU; importing transformers' models sets TORCHINDUCTOR_CACHE_DIR. Both for this module only.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import deepspeed  # noqa: F401
        import transformers.models.bert.modeling_bert  # noqa: F401

        yield


def _train_and_export(tmp: Path, name: str, backend: str, stage: int, dtype: str) -> Exported:
    layer = {"backend": backend, "zero": {"stage": stage}, "precision": {"dtype": dtype}}
    recipe = write_recipe(tmp, name, FAST, EXPORTABLE, layer)
    trained = mplaunch(str(recipe))
    assert trained.returncode == 0, explain(trained)
    run_dir, out = tmp / "runs" / name, tmp / f"{name}-export"
    result = mplaunch("export", str(run_dir), "--out", str(out))
    assert result.returncode == 0, explain(result)
    return Exported(run_dir, out, Plan.from_json((run_dir / "plan.json").read_text()), result.stdout)


# name: (backend, zero.stage, precision.dtype); each trained and exported once, when a test first asks.
RUNS = {
    "zero2_fp32": ("deepspeed", 2, "fp32"),
    "zero3_fp32": ("deepspeed", 3, "fp32"),
    "stage0_bf16": ("deepspeed", 0, "bf16"),
    "accelerate_fp32": ("accelerate", 0, "fp32"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            done[name] = _train_and_export(tmp_path_factory.mktemp("export"), name, *RUNS[name])
        return done[name]

    return get


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _reference(plan: Plan, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plan's transformer with the training module's `state` (keys `lm.…`) loaded strictly."""
    lm = models.build(plan.recipe.model, plan.shape).lm
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()}, strict=True)
    return lm.eval()


def _exported_model(out: Path) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(out)).eval()


def _logits(model: torch.nn.Module, plan: Plan) -> torch.Tensor:
    ids = torch.randint(5, plan.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zero3_by_hand(ds_dir: Path, world: int) -> dict[str, torch.Tensor]:
    """ZeRO-3's fp32 master weights from the shards: each rank holds ceil(numel / world) elements
    of every parameter, in the order of the recorded parameter shapes (padding at the end)."""
    states = _load(ds_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    shards = [_load(ds_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)]
    flats = [shard["optimizer_state_dict"]["fp32_flat_groups"] for shard in shards]
    state: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(states["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            part = math.ceil(shape.numel() / world)
            whole = torch.cat([flats[r][g][offset : offset + part] for r in range(world)])
            state[name] = whole[: shape.numel()].view(shape)
            offset += part
    for alias, name in states["shared_params"].items():  # the tied decoder weight
        state[alias] = state[name]
    return state


# --------------------------------------------------------------------------- exact weights


@pytest.mark.slow
def test_zero2_fp32_export_equals_the_checkpoint_module(runs: Runs) -> None:
    zero2_fp32 = runs("zero2_fp32")
    assert f"exported step {STEPS} of {zero2_fp32.run_dir}" in zero2_fp32.stdout
    written = {p.name for p in zero2_fp32.out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written
    module = _load(zero2_fp32.ds_file("mp_rank_00_model_states.pt"))["module"]
    reference, exported = _reference(zero2_fp32.plan, module), _exported_model(zero2_fp32.out)
    assert type(exported).__name__ == "BertForMaskedLM"
    assert f"{sum(p.numel() for p in exported.parameters()):,} parameters" in zero2_fp32.stdout
    assert exported.bert.embeddings.word_embeddings.weight is exported.cls.predictions.decoder.weight  # tied
    assert torch.equal(_logits(exported, zero2_fp32.plan), _logits(reference, zero2_fp32.plan))


@pytest.mark.slow
def test_zero3_fp32_export_equals_the_shards_put_together_by_hand(runs: Runs) -> None:
    zero3_fp32 = runs("zero3_fp32")
    ds_dir = zero3_fp32.run_dir / DS.format(step=STEPS)
    reference = _reference(zero3_fp32.plan, _zero3_by_hand(ds_dir, zero3_fp32.plan.world_size))
    exported = _exported_model(zero3_fp32.out)
    assert torch.equal(_logits(exported, zero3_fp32.plan), _logits(reference, zero3_fp32.plan))


@pytest.mark.slow
def test_accelerate_fp32_export_equals_its_model_file(runs: Runs) -> None:
    accelerate_fp32 = runs("accelerate_fp32")
    step = accelerate_fp32.run_dir / "checkpoints" / f"step-{STEPS:08d}"
    reference = _reference(accelerate_fp32.plan, _load(step / "pytorch_model.bin"))
    exported = _exported_model(accelerate_fp32.out)
    assert torch.equal(_logits(exported, accelerate_fp32.plan), _logits(reference, accelerate_fp32.plan))


@pytest.mark.slow
def test_bf16_export_holds_the_fp32_masters_that_round_to_the_run_weights(runs: Runs) -> None:
    stage0_bf16 = runs("stage0_bf16")
    held = _load(stage0_bf16.ds_file("mp_rank_00_model_states.pt"))["module"]
    module = {k.removeprefix("lm."): v for k, v in held.items()}
    exported = _exported_model(stage0_bf16.out).state_dict()
    assert {v.dtype for v in exported.values()} == {torch.float32}
    assert module.keys() == exported.keys()
    assert all(torch.equal(exported[k].to(torch.bfloat16), module[k]) for k in module)
    # ... and they are the masters, not the bf16 weights upcast: those would lose the updates' low bits.
    assert any(not torch.equal(exported[k], module[k].float()) for k in module)


@pytest.mark.slow
def test_dtype_bf16_writes_bf16_safetensors(runs: Runs, tmp_path: Path) -> None:
    stage0_bf16 = runs("stage0_bf16")
    from safetensors import safe_open

    out = tmp_path / "bf16"
    result = mplaunch("export", str(stage0_bf16.run_dir), "--dtype", "bf16", "--out", str(out))
    assert result.returncode == 0, explain(result)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    module = _load(stage0_bf16.ds_file("mp_rank_00_model_states.pt"))["module"]
    assert all(torch.equal(v, module[f"lm.{k}"]) for k, v in written.items())


@pytest.mark.slow
def test_stage0_flat_masters_and_a_wrong_order_is_refused(runs: Runs) -> None:
    stage0_bf16 = runs("stage0_bf16")
    saved = _load(stage0_bf16.ds_file("mp_rank_00_model_states.pt"))
    groups = saved["optimizer"]["fp32_groups"]
    per_param = ds_backend._stage0_masters(stage0_bf16.plan, saved["module"], {"fp32_groups": groups})
    flat = {"fp32_groups_flat": [torch.cat([t.flatten() for t in g]) for g in groups]}  # FP16_Optimizer's
    from_flat = ds_backend._stage0_masters(stage0_bf16.plan, saved["module"], flat)
    assert per_param.keys() == from_flat.keys()
    assert all(torch.equal(per_param[k], from_flat[k]) for k in per_param)
    # Two same-shaped masters swapped (a wrong mapping) are caught by the module's own weights.
    g = groups[1]  # biases and norm weights: many share a shape
    i, j = next(
        (i, j)
        for i in range(len(g))
        for j in range(i + 1, len(g))
        if g[i].shape == g[j].shape and not torch.equal(g[i].bfloat16(), g[j].bfloat16())
    )
    swapped = [list(groups[0]), list(g)]
    swapped[1][i], swapped[1][j] = g[j], g[i]
    bad = ds_backend._stage0_masters(stage0_bf16.plan, saved["module"], {"fp32_groups": swapped})
    with pytest.raises(UserError, match="does not round to the module"):
        ds_backend._check_against_module(bad, saved["module"])


# --------------------------------------------------------------------------- the tokenizer


@pytest.mark.slow
def test_exported_tokenizer_encodes_like_the_runs(runs: Runs) -> None:
    zero2_fp32 = runs("zero2_fp32")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    run_tokenizer = Tokenizer.from_file(str(zero2_fp32.run_dir / "tokenizer" / "tokenizer.json"))
    exported = AutoTokenizer.from_pretrained(str(zero2_fp32.out))
    corpus = Path(zero2_fp32.plan.data_paths[0]).read_text()
    lines = [line for line in corpus.splitlines() if line.strip()][:50]
    for text in [*lines, "Mixed precision, ZeRO and an unseen wordpiece: xylophone!"]:
        assert exported(text)["input_ids"] == run_tokenizer.encode(text).ids, text
    assert exported.mask_token == "[MASK]"
    assert exported.mask_token_id == run_tokenizer.token_to_id("[MASK]")
    assert exported.pad_token_id == run_tokenizer.token_to_id("[PAD]")


# --------------------------------------------------------------------------- refusals


def _one_error(result: Any) -> str:
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), explain(result)
    assert "Traceback" not in result.stderr
    return str(lines[0])


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(runs: Runs, tmp_path: Path) -> None:
    zero2_fp32 = runs("zero2_fp32")
    copy = tmp_path / "copy"
    shutil.copytree(zero2_fp32.run_dir, copy)
    victim = copy / DS.format(step=STEPS) / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the CRC-32 can tell
    victim.write_bytes(bytes(data))
    line = _one_error(mplaunch("export", str(copy), "--out", str(tmp_path / "out")))
    assert "mp_rank_00_model_states.pt" in line and "crc32" in line, line
    assert "--step 2" in line, line  # the older checkpoint is offered
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_missing_step_lists_the_available_ones(runs: Runs, tmp_path: Path) -> None:
    zero2_fp32 = runs("zero2_fp32")
    result = mplaunch("export", str(zero2_fp32.run_dir), "--step", "3", "--out", str(tmp_path / "o"))
    line = _one_error(result)
    assert "--step 3" in line and "available: 2, 4" in line, line


@pytest.mark.slow
def test_a_non_empty_out_is_refused_unless_forced(runs: Runs, tmp_path: Path) -> None:
    zero2_fp32 = runs("zero2_fp32")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file\n")
    line = _one_error(mplaunch("export", str(zero2_fp32.run_dir), "--out", str(out)))
    assert "not empty" in line and "--force" in line, line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    forced = mplaunch("export", str(zero2_fp32.run_dir), "--step", "2", "--out", str(out), "--force")
    assert forced.returncode == 0, explain(forced)
    assert "exported step 2 of" in forced.stdout
    assert (out / "notes.txt").read_text() == "my own file\n"  # files an export does not write stay
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine.export-")]  # no staging left


def test_not_a_run_directory(tmp_path: Path) -> None:
    line = _one_error(mplaunch("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")))
    assert "not a run directory" in line, line


def test_export_needs_out(tmp_path: Path) -> None:
    line = _one_error(mplaunch("export", str(tmp_path)))
    assert "--out" in line, line
