"""`mplaunch parity` in real runs (the comparison, the plans and the verb alone: tests/unit/test_parity.py): tiny-BERT runs
that pass (bf16, fp16 with dynamic loss scaling) and one that must fail (fp16 gradients underflowing);
then the fine-tunes: LoRA on the tiny Llama and a full fine-tune of the tiny BERT classifier pass in bf16,
and LoRA with underflowing fp16 gradients fails."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "bert_tiny.yaml"
LORA = ROOT / "recipes" / "llama_sft_tiny.yaml"  # model.hf, LoRA, activation checkpointing, DeepSpeed ZeRO-2
FINE_TUNE = ROOT / "recipes" / "bert_finetune_tiny.yaml"  # model.hf sequence classifier, every weight trains


# ---------------------------------------------------------------- real runs (2 CPU ranks each)


def run_parity(
    out: Path, *overrides: str, steps: int = 20, recipe: Path = TINY
) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "parity",
            str(recipe),
            *overrides,
            "--steps",
            str(steps),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "parity.json").read_text()) if (out / "parity.json").is_file() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def train_steps(run_dir: Path) -> list[int]:
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["kind"] == "train"]


@pytest.mark.slow
def test_bf16_matches_fp32_on_tiny_bert(tmp_path: Path) -> None:
    code, report, output = run_parity(tmp_path, "precision.dtype=bf16")
    assert code == 0, output
    assert report["verdict"] == "pass"
    assert report["dtype"] == "bf16"
    assert report["problems"] == []
    assert report["final_rel_diff"] <= report["tolerance"] == 0.02
    for name in ("fp32", "mixed"):
        assert train_steps(tmp_path / name) == list(range(1, 21))  # every step logged
    plans = {n: json.loads((tmp_path / n / "plan.json").read_text()) for n in ("fp32", "mixed")}
    assert plans["fp32"]["plan"]["precision"]["dtype"] == "fp32"
    assert plans["mixed"]["plan"]["precision"]["dtype"] == "bf16"
    # Same tokenizer, so the same token ids in the same order.
    assert plans["mixed"]["recipe"]["data"]["tokenizer"] == str(tmp_path / "fp32" / "tokenizer")
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 12_000
    assert "PASS: bf16 vs fp32" in output
    # bf16 rounds every layer's step-1 gradient a little (about 2 % on this model), flushes none.
    layers = report["layers"]
    assert len(layers) == 23
    assert all(0 < d["rel_diff"] < 0.2 for d in layers)
    assert all(abs(d["norm_ratio"] - 1) < 0.05 for d in layers)


# fp16 on CPU runs on the accelerate backend; a smaller batch keeps its slow fp16 emulation affordable.
FP16 = ("precision.dtype=fp16", "backend=accelerate", "train.global_batch_size=16")
# 2^-16: the loss, and with it every gradient, is scaled down instead of up, so most fp16 gradients
# flush to zero in the backward pass. The fp32 run does not scale its loss, so it is unaffected.
UNDERFLOW = ("precision.loss_scale.initial=1.52587890625e-05", "precision.loss_scale.min=1.52587890625e-05")


@pytest.mark.slow
def test_fp16_with_dynamic_loss_scaling_matches_fp32(tmp_path: Path) -> None:
    code, report, output = run_parity(tmp_path, *FP16)
    assert code == 0, output
    assert report["verdict"] == "pass"
    assert report["skipped_steps"] == 0


@pytest.mark.slow
def test_fp16_with_underflowing_gradients_fails(tmp_path: Path) -> None:
    # The control above differs from this run only in precision.loss_scale.
    code, report, output = run_parity(tmp_path, *FP16, *UNDERFLOW)
    assert code == 1, output
    assert report["verdict"] == "fail"
    # It fails on the loss comparison: both runs trained every step, none was skipped.
    assert report["problems"] == []
    assert report["compared_steps"] == 20
    assert report["skipped_steps"] == 0
    assert report["final_rel_diff"] > report["tolerance"]
    assert report["final_loss_mixed"] > report["final_loss_fp32"]  # the fp16 run learned less
    assert "FAIL: fp16 vs fp32: final difference over tolerance" in output
    # The attribution names where: the encoder's gradients flushed to zero at step 1.
    worst = {d["layer"]: d for d in report["layers"] if d["rel_diff"] > 0.99}
    assert "lm.bert.encoder.layer.0.attention.self.query" in worst
    assert worst["lm.bert.encoder.layer.0.attention.self.query"]["norm_ratio"] < 0.01
    assert "the layers that differ most from fp32" in output


# ---------------------------------------------------------------- fine-tunes (model.hf), real runs


def first_loss(run_dir: Path) -> float:
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return next(float(r["loss"]) for r in records if r["kind"] == "train")


def optimizer_params(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameter shapes DeepSpeed's optimizer holds, and the frozen ones, from the final checkpoint."""
    import torch

    (states,) = (run_dir / "checkpoints").glob("step-*/deepspeed/mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    trained = {name: shape for group in saved["param_shapes"] for name, shape in group.items()}
    return trained, dict(saved["frozen_param_shapes"])


@pytest.mark.slow
def test_lora_bf16_matches_fp32_and_trains_the_adapters_only(tiny_models: Path, tmp_path: Path) -> None:
    code, report, output = run_parity(tmp_path, "precision.dtype=bf16", recipe=LORA)
    assert code == 0, output
    assert (report["verdict"], report["backend"], report["problems"]) == ("pass", "deepspeed", [])
    assert report["final_rel_diff"] <= report["tolerance"] == 0.02
    for name in ("fp32", "mixed"):
        assert train_steps(tmp_path / name) == list(range(1, 21))
    assert report["final_loss_fp32"] < first_loss(tmp_path / "fp32") - 0.2  # the adapters learned
    # Both runs print what trains; the optimizer holds exactly those parameters: the adapters.
    line = r"LoRA rank 8 on q_proj, k_proj, v_proj, o_proj: ([\d,]+) of ([\d,]+) parameters train"
    said = re.findall(line, output)
    assert len(said) == 2
    assert said[0] == said[1]
    num_trainable, num_params = (int(n.replace(",", "")) for n in said[0])
    for name in ("fp32", "mixed"):
        trained, frozen = optimizer_params(tmp_path / name)
        assert all(".lora_A." in n or ".lora_B." in n for n in trained)
        assert sum(math.prod(s) for s in trained.values()) == num_trainable
        assert sum(math.prod(s) for s in frozen.values()) == num_params - num_trainable
    assert "PASS: bf16 vs fp32" in output


@pytest.mark.slow
def test_a_full_fine_tune_in_bf16_matches_fp32(tiny_models: Path, tmp_path: Path) -> None:
    # The recipe's own 40 steps: fewer leave the classifier near chance (ln 4), where any run agrees.
    code, report, output = run_parity(tmp_path, "precision.dtype=bf16", steps=40, recipe=FINE_TUNE)
    assert code == 0, output
    assert (report["verdict"], report["backend"], report["problems"]) == ("pass", "accelerate", [])
    assert report["compared_steps"] == 40
    assert report["final_loss_fp32"] < first_loss(tmp_path / "fp32") - 0.05  # it learned
    plans = {n: json.loads((tmp_path / n / "plan.json").read_text()) for n in ("fp32", "mixed")}
    # Both runs tokenize with the model's own tokenizer, named by the same path.
    assert plans["fp32"]["plan"]["tokenizer_dir"] == plans["mixed"]["plan"]["tokenizer_dir"]
    assert plans["mixed"]["plan"]["tokenizer_dir"] == str(tiny_models / "tiny-bert")
    assert plans["mixed"]["recipe"]["data"]["tokenizer"] is None
    assert "PASS: bf16 vs fp32" in output


@pytest.mark.slow
def test_lora_with_underflowing_fp16_gradients_fails(tiny_models: Path, tmp_path: Path) -> None:
    # The LoRA test above passes on the same recipe; here the adapters' fp16 gradients flush to zero.
    code, report, output = run_parity(
        tmp_path, "precision.dtype=fp16", "backend=accelerate", *UNDERFLOW, recipe=LORA
    )
    assert code == 1, output
    assert (report["verdict"], report["problems"], report["skipped_steps"]) == ("fail", [], 0)
    assert report["final_rel_diff"] > report["tolerance"]
    assert report["final_loss_mixed"] > report["final_loss_fp32"]  # the fp16 run learned less
    assert "FAIL: fp16 vs fp32: final difference over tolerance" in output
    # The attribution names where: the B adapters' gradients flushed to zero at step 1 (the A
    # adapters' are zero in fp32 too while B is zero, so they are not compared).
    worst = {d["layer"]: d for d in report["layers"] if d["rel_diff"] > 0.99}
    b = "lm.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"
    assert b in worst
    assert worst[b]["norm_ratio"] < 0.01
    assert not any("lora_A" in d["layer"] for d in report["layers"])
