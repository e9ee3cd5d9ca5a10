"""`mplaunch report`'s summary names the last evaluation's task metric (perplexity, accuracy, F1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.analysis.report import summarize
from launcher.rundir.metrics_log import read_metrics

T0 = 1_700_000_000.0


def _run(tmp_path: Path, evals: list[dict[str, Any]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    train = {"kind": "train", "step": 10, "time": T0 + 10, "loss": 2.0, "lr": 1e-4}
    records = [train, *({"kind": "eval", "time": T0 + e["step"], **e} for e in evals)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _last_eval(run: Path) -> str:
    return dict(summarize(run, read_metrics(run)).rows())["last eval"]


def test_a_language_model_s_perplexity(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        [
            {"step": 5, "eval_loss": 3.0, "eval_labels": 640, "eval_perplexity": 20.09},
            {"step": 10, "eval_loss": 2.0, "eval_labels": 640, "eval_perplexity": 7.389},
        ],
    )
    assert _last_eval(run) == "perplexity 7.389 at step 10"


def test_a_classifier_s_accuracy_and_f1(tmp_path: Path) -> None:
    run = _run(
        tmp_path, [{"step": 10, "eval_loss": 0.5, "eval_labels": 64, "eval_accuracy": 0.8125, "eval_f1": 0.8}]
    )
    assert _last_eval(run) == "accuracy 0.8125, F1 0.8 at step 10"


@pytest.mark.parametrize("evals", [[], [{"step": 10, "eval_loss": 2.0}]])
def test_no_metric_recorded(tmp_path: Path, evals: list[dict[str, Any]]) -> None:
    assert _last_eval(_run(tmp_path, evals)) == "n/a"  # no evaluation, or one written before the metrics
