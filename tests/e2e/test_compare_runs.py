"""`mplaunch compare` on real runs: three tiny-MLP trainings (accelerate, one CPU rank, 6 steps) that
differ only in optimizer.lr, compared as the directory that holds them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.analysis import figure
from launcher.analysis.compare_runs import compare
from tests.runs import explain, mplaunch

pytestmark = pytest.mark.slow

LRS = ("0.001", "0.01", "0.1")
RECIPE: dict[str, Any] = {
    "name": "mlp",
    "backend": "accelerate",
    "model": {"name": "tiny-mlp"},
    "data": {"kind": "synthetic"},
    "train": {"micro_batch_size": 4, "max_steps": 6, "eval_every": 3},
    "launch": {"device": "cpu", "nproc_per_node": 1},
    "precision": {"dtype": "fp32"},
    "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
}


def test_compare_three_real_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "mlp.yaml"
    recipe.write_text(
        yaml.safe_dump({**RECIPE, "logging": {**RECIPE["logging"], "dir": str(tmp_path / "runs")}})
    )
    for lr in LRS:
        done = mplaunch(str(recipe), f"optimizer.lr={lr}", f"name=lr-{lr}")
        assert done.returncode == 0, explain(done)
    legends: dict[str, list[str]] = {}
    finish = figure.finish

    def spy(fig: Any, axes: Any, path: Path, title: str, context: str, above: bool = False) -> Path:
        legends[path.name] = [t.get_text() for t in fig.legends[0].texts]
        return finish(fig, axes, path, title, context, above)

    monkeypatch.setattr(figure, "finish", spy)
    out = tmp_path / "cmp"
    assert compare([tmp_path / "runs"], out) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["run", "keys", "state", "steps"]
    for line, lr in zip(printed[1:4], LRS, strict=True):
        assert line.split()[0] == f"lr-{lr}"
        assert f" optimizer.lr={lr} " in line
        assert " finished " in line
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["optimizer.lr"], r["steps"]) for r in rows] == [(f"lr-{lr}", lr, "6") for lr in LRS]
    assert all(float(r["final_eval_loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert sum(r["best"] == "True" for r in rows) == 1
    plots = ("loss.png", "eval_loss.png", "lr.png", "throughput.png")
    assert sorted(legends) == sorted(plots)
    for name in plots:
        assert legends[name] == [f"optimizer.lr={lr}" for lr in LRS], name
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert printed[-1] == f"compare: wrote compare.md, compare.csv, {', '.join(plots)} in {out}"
