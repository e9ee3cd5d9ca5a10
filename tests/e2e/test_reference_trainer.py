"""Same numbers as the reference (issue 25, item 7): a tiny Hugging Face causal LM trained by
transformers' `Trainer` and by `mplaunch RECIPE` on the same rows, in the same order, on the same ranks.

fp32, 2 CPU ranks (gloo), every backend and ZeRO stage, and once with LoRA: every step's training
loss within 1e-4 relative of Trainer's, and the final evaluation loss too. In bf16 the gap is
measured and printed, not asserted (the two autocast differently on DeepSpeed).

What is held equal, and how:
- weights: the model folder itself (a copy of recipes/models' with every dropout set to 0); LoRA's
  random A matrices come from the same seed, set before the model is built as mplaunch sets it;
- rows: one document per row (data.pack false: padding, so micro-batches carry different numbers of
  label tokens), held out and ordered by mplaunch's documented schedule, rebuilt in
  tests/reference_trainer.py and fed through Trainer's sequential sampler;
- optimizer: AdamW with the same lr, betas, eps and weight decay, decayed on the same parameters
  (the script reports any Trainer decays differently); Hugging Face's linear warm-up and decay
  (scheduler.warmup_style hf), and the lr each step used is compared too; gradient clipping at 1.0;
- loss: Trainer's token-weighted normalisation across ranks and accumulation steps
  (average_tokens_across_devices), logged per step as the token-weighted mean of the global batch;
- evaluation: the token-weighted loss over every held-out row.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.runs import ROOT, TESTS, explain, mplaunch, records

RTOL = 1e-4
STEPS = 16  # crosses into the second epoch (108 training rows, 8 a step)
SEED = 1234
SETTINGS: dict[str, Any] = {
    "seq_len": 32,
    "micro": 2,
    "accum": 2,
    "steps": STEPS,
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "scheduler": "linear",
    "warmup_steps": 3,  # Hugging Face's warm-up: lr 0 at step 1, n/3 after (scheduler.warmup_style hf)
    "grad_clip": 1.0,
    "seed": SEED,
    "eval_fraction": 0.1,  # 12 of 120 rows: 3 micro-batches a rank
}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
CASES = {  # name: (backend, ZeRO stage, LoRA)
    "deepspeed-zero0": ("deepspeed", 0, False),
    "deepspeed-zero1": ("deepspeed", 1, False),
    "deepspeed-zero2": ("deepspeed", 2, False),
    "deepspeed-zero3": ("deepspeed", 3, False),
    "accelerate": ("accelerate", 0, False),
    "accelerate-lora": ("accelerate", 0, True),
}
BF16_CASES = ("accelerate", "deepspeed-zero0", "deepspeed-zero2")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def _corpus(path: Path, num_docs: int = 120) -> Path:
    """Documents of 1 to 3 sentences of the shipped corpus: some padded, some cut at seq_len."""
    text = (ROOT / "recipes" / "data" / "corpus.txt").read_text()
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(".") if s.strip()]
    rng = random.Random(0)
    path.write_text(
        "\n".join(" ".join(rng.sample(sentences, rng.randint(1, 3))) for _ in range(num_docs)) + "\n"
    )
    return path


def _without_dropout(source: Path, target: Path) -> Path:
    """A copy of a model folder with every dropout probability of its config.json set to 0."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in config.items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            config[key] = 0.0
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("reference-inputs")
    return {
        "data": _corpus(tmp / "docs.txt"),
        "gpt2": _without_dropout(tiny_models / "tiny-gpt2", tmp / "gpt2"),
        "llama": _without_dropout(tiny_models / "tiny-llama", tmp / "llama"),
    }


def _trainer(tmp: Path, model: Path, data: Path, dtype: str, lora: bool) -> dict[str, Any]:
    """Train with transformers' Trainer under torchrun (2 CPU ranks); its per-step losses and eval."""
    spec = {
        **SETTINGS,
        "model": str(model),
        "data": str(data),
        "dtype": dtype,
        "lora": LORA if lora else None,
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(TESTS / "reference_trainer.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
        capture_output=True, text=True, timeout=900, cwd=tmp, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, explain(done)
    out: dict[str, Any] = json.loads((tmp / "out.json").read_text())
    for key in ("train", "train_batch", "lr"):  # JSON's keys are strings
        out[key] = {int(k): v for k, v in out[key].items()}
    return out


def _mplaunch(tmp: Path, model: Path, data: Path, dtype: str, case: str) -> Path:
    """Train the same model on the same data with `mplaunch RECIPE`; its run directory."""
    backend, stage, lora = CASES[case]
    s = SETTINGS
    body = {
        "name": case,
        "model": {"name": None, "hf": str(model), **({"lora": {**LORA, "dropout": 0.0}} if lora else {})},
        "data": {"task": "causal-lm", "kind": "text", "paths": [str(data)], "pack": False,
                 "seq_len": s["seq_len"], "eval_fraction": s["eval_fraction"]},
        "train": {"micro_batch_size": s["micro"], "grad_accum": s["accum"], "max_steps": STEPS,
                  "eval_every": STEPS, "eval_steps": 100, "grad_clip": s["grad_clip"], "seed": SEED},
        "optimizer": {"lr": s["lr"], "betas": s["betas"], "eps": s["eps"], "weight_decay": s["weight_decay"]},
        "scheduler": {"name": s["scheduler"], "warmup_steps": s["warmup_steps"], "warmup_style": "hf",
                      "min_lr_ratio": 0.0},
        "precision": {"dtype": dtype},
        "backend": backend,
        **({"zero": {"stage": stage}} if backend == "deepspeed" else {}),
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "logging": {"dir": str(tmp / "runs"), "every_steps": 1, "tensorboard": False, "progress": False},
        "checkpoint": {"every_steps": 0},
    }  # fmt: skip
    recipe = tmp / f"{case}.yaml"
    recipe.write_text(yaml.safe_dump(body, sort_keys=False))
    result = mplaunch(str(recipe), env=OFFLINE)
    assert result.returncode == 0, explain(result)
    return tmp / "runs" / case


class Gaps(NamedTuple):
    """How far an mplaunch run is from Trainer's."""

    steps: dict[int, float]  # each step's training loss, relative
    eval: float  # the final evaluation loss, relative
    lr: float  # the largest difference of a step's logged lr, relative to the peak lr


def _gaps(ours: Path, reference: dict[str, Any]) -> Gaps:
    train = {r["step"]: r for r in records(ours, "train")}
    assert sorted(train) == sorted(reference["train"]) == list(range(1, STEPS + 1))
    steps = {k: abs(train[k]["loss"] - ref) / abs(ref) for k, ref in reference["train"].items()}
    lr = max(abs(train[k]["lr"] - ref) for k, ref in reference["lr"].items()) / SETTINGS["lr"]
    evals = records(ours, "eval")
    assert evals, "no eval record"
    assert evals[-1]["step"] == STEPS, evals
    return Gaps(steps, abs(evals[-1]["eval_loss"] - reference["eval"]) / abs(reference["eval"]), lr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Any:
    """Trainer's run for (dtype, LoRA), trained once per module."""
    done: dict[tuple[str, bool], dict[str, Any]] = {}

    def get(dtype: str, lora: bool) -> dict[str, Any]:
        if (dtype, lora) not in done:
            tmp = tmp_path_factory.mktemp(f"trainer-{dtype}-{'lora' if lora else 'full'}")
            done[dtype, lora] = _trainer(
                tmp, inputs["llama" if lora else "gpt2"], inputs["data"], dtype, lora
            )
        return done[dtype, lora]

    return get


def _report(case: str, dtype: str, gaps: Gaps) -> str:
    """One line: the largest step gap (and its step), step 1's, the evaluation's and the lr's."""
    worst = max(gaps.steps, key=lambda k: gaps.steps[k])
    line = (
        f"{case} {dtype}: max step gap {gaps.steps[worst]:.2e} (step {worst}), step 1 {gaps.steps[1]:.2e}, "
        f"eval {gaps.eval:.2e}, lr {gaps.lr:.2e}"
    )
    print(line)
    return line


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_losses_match_trainer(
    case: str, inputs: dict[str, Path], reference: Any, tmp_path: Path
) -> None:
    lora = CASES[case][2]
    ref = reference("fp32", lora)
    assert ref["decay_mismatch"] == [], "Trainer decays other parameters than mplaunch: not a fair comparison"
    # Or the rows would not tell token-weighted normalisation from the mean of micro-batch means.
    apart = max(abs(ref["train"][k] - ref["train_batch"][k]) / ref["train"][k] for k in ref["train"])
    assert apart > 10 * RTOL, f"the micro-batches carry too evenly many label tokens ({apart:.1e})"
    ours = _mplaunch(tmp_path, inputs["llama" if lora else "gpt2"], inputs["data"], "fp32", case)
    gaps = _gaps(ours, ref)
    line = _report(case, "fp32", gaps)
    assert max(gaps.steps.values()) <= RTOL, f"{line}\nper step: {gaps.steps}"
    assert gaps.eval <= RTOL, line
    assert gaps.lr <= 1e-9, f"{line}: the logged lr is not the lr the step used"


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_gap_to_trainer_is_measured(
    case: str, inputs: dict[str, Path], reference: Any, tmp_path: Path
) -> None:
    """bf16 against Trainer's bf16 (autocast): measured and printed (run with -s), not asserted."""
    ref = reference("bf16", False)
    ours = _mplaunch(tmp_path, inputs["gpt2"], inputs["data"], "bf16", case)
    _report(case, "bf16", _gaps(ours, ref))
