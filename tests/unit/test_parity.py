"""mplaunch parity without training: the comparison, the pair of plans, the verb with fake runs, the attribution."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.analysis import parity
from launcher.analysis.compare import compare
from launcher.analysis.parity import fresh, pin_tokenizer, plan_pair
from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.rundir.metrics_log import Metrics
from tests.runs import ROOT, TINY

FINE_TUNE = ROOT / "recipes" / "bert_finetune_tiny.yaml"  # model.hf sequence classifier, every weight trains
CPU = Hardware(cpu_count=4, cpu_bf16=True)  # auto resolves bf16 only where the CPU computes it natively


def metrics(losses: list[float], samples_per_s: float = 100.0) -> Metrics:
    train = tuple(
        {"kind": "train", "step": i, "loss": loss, "samples_per_s": samples_per_s}
        for i, loss in enumerate(losses, 1)
    )
    return Metrics(train, (), (), ())


def decaying(steps: int, rate: float = 0.01, noise: float = 0.0) -> list[float]:
    return [6.0 * math.exp(-rate * s) * (1 + noise * (-1) ** s) for s in range(1, steps + 1)]


def test_identical_runs_pass_with_zero_difference() -> None:
    result = compare(metrics(decaying(30)), metrics(decaying(30), 50.0), "bf16", 30, 0.02)
    assert result.passed
    assert result.median_rel_diff == result.max_rel_diff == result.final_rel_diff == 0
    assert result.speed_ratio == pytest.approx(0.5)
    assert result.final_window == 3  # 10 % of 30 steps


def test_noise_that_cancels_passes_and_a_gap_that_grows_fails() -> None:
    ref = decaying(40)
    noisy = compare(metrics(ref), metrics(decaying(40, noise=0.01)), "bf16", 40, 0.02)
    assert noisy.max_rel_diff == pytest.approx(0.01)
    assert noisy.passed
    # Training 40 % slower: the gap reaches ~10 % of the loss by the end.
    slower = compare(metrics(ref), metrics(decaying(40, rate=0.006)), "fp16", 40, 0.02)
    assert not slower.passed
    assert slower.final_rel_diff > 0.1
    assert slower.max_rel_diff_step == 40
    assert slower.lines()[-1] == "FAIL: fp16 vs fp32: final difference over tolerance"


def test_final_difference_is_over_the_mean_loss_of_the_last_tenth() -> None:
    ref, got = [5.0] * 20, [5.0] * 18 + [5.2, 4.9]  # last 10 %: steps 19 and 20
    result = compare(metrics(ref), metrics(got), "bf16", 20, 0.02)
    assert result.final_window == 2
    assert result.final_rel_diff == pytest.approx(abs(5.05 - 5.0) / 5.0)
    assert result.max_rel_diff == pytest.approx(0.04)
    assert result.max_rel_diff_step == 19


def test_tolerance_is_inclusive() -> None:
    assert compare(metrics([1.0]), metrics([1.02]), "bf16", 1, 0.03).passed
    assert not compare(metrics([1.0]), metrics([1.04]), "bf16", 1, 0.03).passed


def test_skipped_fp16_steps_are_left_out_and_counted() -> None:
    got = decaying(20)
    got[0] = got[1] = float("nan")  # a skipped step logs no loss
    result = compare(metrics(decaying(20)), metrics(got), "fp16", 20, 0.02)
    assert result.skipped_steps == 2
    assert result.compared_steps == 18
    assert result.passed
    assert "2 skipped fp16 steps left out" in result.lines()[0]


def test_a_mixed_run_that_stopped_early_fails() -> None:
    result = compare(metrics(decaying(20)), metrics(decaying(12)), "bf16", 20, 0.02)
    assert not result.passed
    assert result.problems == ("the bf16 run logged 12 of 20 steps",)


def test_a_mixed_run_with_no_records_fails() -> None:
    result = compare(metrics(decaying(5)), Metrics((), (), (), ()), "fp16", 5, 0.02)
    assert not result.passed
    assert result.final_rel_diff is None
    assert "no step has a loss in both runs" in result.problems


def test_plan_pair_runs_the_same_recipe_in_fp32_and_the_mixed_dtype(tmp_path: Path) -> None:
    pair = plan_pair(TINY, ["precision.dtype=bf16", "train.seed=7"], 25, str(tmp_path / "out"), CPU)
    fp32, mixed = pair.reference, pair.mixed
    assert (fp32.precision.dtype, mixed.precision.dtype) == ("fp32", "bf16")
    assert Path(fp32.run_dir) == tmp_path / "out" / "fp32"
    assert Path(mixed.run_dir) == tmp_path / "out" / "mixed"
    for plan in (fp32, mixed):
        r = plan.recipe
        assert r.train.max_steps == 25
        assert r.train.seed == 7
        assert r.logging.every_steps == 1
        assert r.checkpoint.resume == "never"
        assert r.checkpoint.every_steps == 0
        assert r.checkpoint.dir is None
        assert r.train.eval_every == 0  # the recipe's 50 is past the end
    assert fp32.recipe.precision.allow_tf32 is False  # the reference is plain fp32
    # Nothing but precision differs between the two runs.
    a, b = fp32.recipe.model_dump(), mixed.recipe.model_dump()
    assert {k for k in a if a[k] != b[k]} == {"name", "precision"}


def test_fp8_is_compared_with_bf16(tmp_path: Path) -> None:
    pair = plan_pair(TINY, ["precision.dtype=fp8"], 5, str(tmp_path), CPU)
    assert (pair.reference.precision.dtype, pair.mixed.precision.dtype) == ("bf16", "fp8")
    assert Path(pair.reference.run_dir) == tmp_path / "bf16"
    assert pair.reference.recipe.precision.allow_tf32 is False


def test_an_fp8_range_event_fails_parity_however_close_the_losses() -> None:
    event = {
        "kind": "event", "step": 5, "event": "fp8_range", "cause": "fp8 casts lose values in 1 of 2 fp8 layers",
        "remedy": "keep these layers in bf16: 'precision.fp8.keep=[mid]'",
    }  # fmt: skip
    same = decaying(5)
    clean = compare(metrics(same), metrics(same), "fp8", 5, 0.02, reference="bf16")
    assert clean.passed
    assert clean.lines()[-1] == "PASS: fp8 vs bf16"
    fired = Metrics(metrics(same).train, (), (event,), ())
    result = compare(metrics(same), fired, "fp8", 5, 0.02, reference="bf16")
    assert not result.passed
    assert result.problems == (
        "fp8 x-ray of the fp8 run, step 5: fp8 casts lose values in 1 of 2 fp8 layers; "
        "keep these layers in bf16: 'precision.fp8.keep=[mid]'",
    )
    assert result.lines()[-1].startswith("FAIL: fp8 vs bf16: fp8 x-ray of the fp8 run, step 5")


def test_a_tokenizer_the_recipe_brings_is_not_pinned(tiny_models: Path, tmp_path: Path) -> None:
    # Only a tokenizer the fp32 run trained is handed to the mixed run; model.hf's own stays in both plans,
    # even if the fp32 run directory holds a tokenizer.json.
    pair = plan_pair(FINE_TUNE, ["precision.dtype=bf16"], 5, str(tmp_path), CPU)
    assert pair.mixed.tokenizer_dir == pair.reference.tokenizer_dir == str(tiny_models / "tiny-bert")
    (tmp_path / "fp32" / "tokenizer").mkdir(parents=True)
    shutil.copy(tiny_models / "tiny-bert" / "tokenizer.json", tmp_path / "fp32" / "tokenizer")
    assert pin_tokenizer(pair, FINE_TUNE, CPU) is pair


def test_default_out_is_under_the_logging_dir(tmp_path: Path) -> None:
    pair = plan_pair(TINY, ["precision.dtype=bf16", f"logging.dir={tmp_path}"], 5, None, CPU)
    assert pair.out == tmp_path / "parity-bert-tiny-mlm"


def test_auto_precision_resolves_to_the_machines_mixed_dtype(tmp_path: Path) -> None:
    pair = plan_pair(TINY, ["precision.dtype=auto"], 5, str(tmp_path), CPU)
    assert pair.mixed.precision.dtype == "bf16"


def test_auto_precision_on_a_cpu_without_native_bf16_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="precision resolves to fp32"):
        plan_pair(TINY, ["precision.dtype=auto"], 5, str(tmp_path), Hardware(cpu_count=4))


def test_an_fp32_recipe_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["parity", str(TINY), "precision.dtype=fp32", "--steps", "5", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "pass precision.dtype=bf16 or precision.dtype=fp16" in err
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps: 0"),
        (["--steps", "5", "--tolerance", "-1"], "--tolerance"),
        (["--steps", "5", "train.max_stepz=3"], "train.max_stepz"),
        ([], "--steps"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["parity", str(TINY), "precision.dtype=bf16", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_fresh_removes_an_earlier_run_but_nothing_else(tmp_path: Path) -> None:
    run = tmp_path / "mixed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "plan.json").write_text("{}")
    fresh(run)
    assert not run.exists()
    other = tmp_path / "fp32"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a run directory"):
        fresh(other)
    assert (other / "notes.txt").is_file()


def test_parity_is_a_verb() -> None:
    assert cli.VERBS["parity"] is cli.cmd_parity
    assert parity.DEFAULT_TOLERANCE == 0.02


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace the launches: each writes `steps` train records into its run dir and returns `code`."""
    outcome = {"fp32_code": 0, "mixed_code": 0, "mixed_steps": 10}

    def fake_run(plan: Any, label: str) -> int:
        run_dir = Path(plan.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(plan.to_json())
        mixed = plan.precision.dtype != "fp32"
        steps = outcome["mixed_steps"] if mixed else 10
        lines = [
            {"kind": "train", "step": s, "time": 1.0 + s, "loss": 6.0 - 0.01 * s, "samples_per_s": 10.0}
            for s in range(1, steps + 1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        code = outcome["mixed_code" if mixed else "fp32_code"]
        if code == 1:
            (run_dir / "logs").mkdir()
            (run_dir / "logs" / "rank-0.err").write_text(
                "fp16 gradients overflow at the minimum\n\nTraceback ..."
            )
        return code

    monkeypatch.setattr(parity, "_run", fake_run)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: CPU))
    return outcome


def parity_main(out: Path) -> int:
    return cli.main(
        [
            "parity",
            str(TINY),
            "precision.dtype=fp16",
            "backend=accelerate",
            "--steps",
            "10",
            "--out",
            str(out),
        ]
    )


def test_main_passes_and_writes_the_report(fake_runs: dict[str, int], tmp_path: Path) -> None:
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "plan.json").write_text("{}")  # an earlier check's run: replaced
    (tmp_path / "mixed" / "stale.txt").write_text("old")
    assert parity_main(tmp_path) == 0
    body = json.loads((tmp_path / "parity.json").read_text())
    assert body["verdict"] == "pass"
    assert body["final_rel_diff"] == 0
    assert body["runs"] == {"fp32": str(tmp_path / "fp32"), "mixed": str(tmp_path / "mixed")}
    assert not (tmp_path / "mixed" / "stale.txt").exists()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_mixed_run_that_crashes_fails_with_its_reason(
    fake_runs: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_runs.update(mixed_code=1, mixed_steps=3)
    assert parity_main(tmp_path) == 1
    body = json.loads((tmp_path / "parity.json").read_text())
    assert body["verdict"] == "fail"
    assert body["problems"][0] == "the fp16 run failed (exit 1): fp16 gradients overflow at the minimum"
    assert "FAIL: fp16 vs fp32: the fp16 run failed" in capsys.readouterr().out


def test_a_failed_reference_run_compares_nothing(
    fake_runs: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_runs.update(fp32_code=1)
    assert parity_main(tmp_path) == 1
    assert "the fp32 run failed (exit 1)" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
    assert not (tmp_path / "parity.json").exists()


def test_an_interrupted_run_returns_its_signal_status(fake_runs: dict[str, int], tmp_path: Path) -> None:
    fake_runs.update(mixed_code=130)
    assert parity_main(tmp_path) == 130
    assert not (tmp_path / "parity.json").exists()


def test_parity_without_matplotlib_refuses_before_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `report` extra were not installed
    monkeypatch.setattr(parity, "plan_pair", lambda *a, **k: pytest.fail("parity planned runs first"))
    code = cli.main(["parity", str(TINY), "--steps", "5", "--out", str(tmp_path / "p")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: mplaunch parity needs matplotlib (not installed) (hint: pip install -e '.[report]')"
    )
    assert not (tmp_path / "p").exists()


def test_attribution_ranks_layers_by_their_step_1_gradient_difference() -> None:
    from launcher.analysis.compare import attribution

    def xray(rows: dict[str, tuple[list[float], float]], step: int = 1, skipped: bool = False) -> Metrics:
        layers = {n: {"elements": 4, "sketch": s, "grad_norm": g} for n, (s, g) in rows.items()}
        record = {"kind": "precision", "step": step, "skipped": skipped, "layers": layers}
        return Metrics((), (), (), (), 0, (record,))

    fp32 = xray({"a": ([3.0, 4.0], 5.0), "b": ([1.0, 0.0], 1.0), "dead": ([0.0, 0.0], 0.0)})
    mixed = xray({"a": ([3.0, 4.5], 5.3), "b": ([0.0, 0.0], 0.0), "dead": ([0.0, 0.0], 0.0)})
    layers, why = attribution(fp32, mixed)
    assert why is None
    assert [(d.layer, d.rel_diff, d.norm_ratio) for d in layers] == [("b", 1.0, 0.0), ("a", 0.1, 5.3 / 5.0)]
    assert (
        attribution(fp32, xray({}, skipped=True))[1]
        == "the mixed run's step 1 overflowed in fp16 and was skipped"
    )
    assert "no precision x-ray of step 1" in str(attribution(fp32, xray({}, step=5))[1])
