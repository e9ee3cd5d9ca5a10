"""fp8 against bf16 in real runs (2 CPU ranks, emulated fp8): `mplaunch parity RECIPE precision.dtype=fp8`
passes on the tiny GPT-2 and BERT recipes with no fp8_range event; a layer fed an outlier far beyond
e4m3's range (tests/fp8_outlier_model.py) fires the event, fails parity and is drawn in report's fp8
heatmap, and keeping that layer in bf16 with the event's own override passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.runs import ROOT, explain, mplaunch, records

pytestmark = pytest.mark.slow

GPT2 = ROOT / "recipes" / "gpt2_tiny.yaml"
BERT = ROOT / "recipes" / "bert_tiny.yaml"
OUTLIER = {
    "extends": str(GPT2),
    "name": "outlier",
    "backend": "accelerate",
    "model": {"name": None, "target": "fp8_outlier_model:build"},
    "data": {"seq_len": 32},
    "train": {"micro_batch_size": 4, "global_batch_size": 16, "eval_every": 0},
    "logging": {"precision_every": 5, "tensorboard": False, "progress": False},
    "precision": {"dtype": "fp8"},
}


def parity(out: Path, recipe: Path, *overrides: str, steps: int = 20) -> tuple[int, dict[str, Any], str]:
    result = mplaunch("parity", str(recipe), *overrides, "--steps", str(steps), "--out", str(out))
    report = json.loads((out / "parity.json").read_text()) if (out / "parity.json").is_file() else {}
    return result.returncode, report, explain(result)


def fp8_events(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in records(run_dir, "event") if e["event"] == "fp8_range"]


@pytest.mark.parametrize("recipe", [GPT2, BERT], ids=["gpt2_tiny", "bert_tiny"])
def test_fp8_matches_bf16_on_the_tiny_recipes(tmp_path: Path, recipe: Path) -> None:
    code, report, output = parity(tmp_path, recipe, "precision.dtype=fp8", "logging.precision_every=5")
    assert code == 0, output
    assert (report["verdict"], report["dtype"], report["reference"]) == ("pass", "fp8", "bf16")
    assert report["final_rel_diff"] <= report["tolerance"] / 2  # with margin
    assert "PASS: fp8 vs bf16" in output
    assert set(report["runs"]) == {"bf16", "mixed"}
    plans = {n: json.loads((tmp_path / n / "plan.json").read_text()) for n in ("bf16", "mixed")}
    assert plans["bf16"]["plan"]["precision"]["dtype"] == "bf16"
    assert fp8_events(tmp_path / "mixed") == []
    xrays = records(tmp_path / "mixed", "precision")
    converted = [n for n, row in xrays[0]["layers"].items() if "fp8_input_underflow" in row]
    assert converted  # the fp8 columns are in the records
    shares = [
        x["layers"][n][f"fp8_{r}_underflow"]
        for x in xrays
        for n in converted
        for r in ("input", "weight", "grad")
    ]
    assert max(shares) < 0.01
    # The attribution compares every layer's step-1 gradient, the fp8 layers included.
    attributed = {d["layer"]: d for d in report["layers"]}
    assert set(converted) <= set(attributed)
    assert all(abs(attributed[n]["norm_ratio"] - 1) < 0.2 for n in converted)


def write(tmp_path: Path, **changes: Any) -> Path:
    import yaml

    body = {**OUTLIER, "logging": {**OUTLIER["logging"], "dir": str(tmp_path / "runs")}}
    body["precision"] = {**OUTLIER["precision"], **changes}
    path = tmp_path / "outlier.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_an_outlier_layer_fires_fp8_range_fails_parity_and_keeping_it_in_bf16_passes(tmp_path: Path) -> None:
    code, report, output = parity(tmp_path / "broken", write(tmp_path))
    assert code == 1, output
    (event,) = fp8_events(tmp_path / "broken" / "mixed")  # named once, at the first x-ray
    assert event["step"] == 1
    assert list(event["layers"]) == ["block.mid"]  # block.out, also fp8, is healthy
    assert event["layers"]["block.mid"]["input_underflow"] > 0.9
    assert event["override"] == "precision.fp8.keep=[mid]"
    problem = next(p for p in report["problems"] if p.startswith("fp8 x-ray of the fp8 run, step 1"))
    assert "'precision.fp8.keep=[mid]'" in problem
    assert "FAIL: fp8 vs bf16" in output
    assert fp8_events(tmp_path / "broken" / "bf16") == []  # bf16 has no fp8 casts to judge

    shown = mplaunch("report", str(tmp_path / "broken" / "mixed"))
    assert shown.returncode == 0, explain(shown)
    png = (tmp_path / "broken" / "mixed" / "report" / "fp8.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warnings name 1 layer (block.mid)" in shown.stdout

    code, report, output = parity(tmp_path / "kept", write(tmp_path, fp8={"keep": ["mid"]}))
    assert code == 0, output
    assert fp8_events(tmp_path / "kept" / "mixed") == []
    assert report["final_rel_diff"] <= report["tolerance"]
