"""Every shipped recipe loads, plans on a CPU machine and on an 8xH100 machine, and dry-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher import cli
from launcher.plan.hardware import Gpu, Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
CPU = Hardware(cpu_count=2)
H100x8 = Hardware(
    gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30) for i in range(8)), cpu_count=64
)
MACHINES = {"cpu": CPU, "8xH100": H100x8}


@pytest.fixture(autouse=True)
def _models(tiny_models: Path) -> None:
    """The model directories the fine-tuning recipes name (recipes/models/make_tiny.py)."""


def test_there_are_shipped_recipes() -> None:
    assert {p.name for p in SHIPPED} >= {
        "bert.yaml",
        "bert_tiny.yaml",
        "bert_finetune.yaml",
        "bert_finetune_tiny.yaml",
        "llama_sft.yaml",
        "llama_sft_tiny.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_recipe_starts_with_a_one_line_description(path: Path) -> None:
    # `mplaunch recipes` shows this line.
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ")
    assert len(first) > 10


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_recipe_plans(path: Path, machine: str) -> None:
    recipe = load(path)
    plan = resolve(recipe, MACHINES[machine])
    b = plan.batch
    assert b.global_batch_size == b.micro_batch_size * b.grad_accum * plan.world_size
    assert plan.precision.dtype in ("bf16", "fp16", "fp32")
    assert all(Path(p).is_file() for p in plan.data_paths)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("machine", MACHINES, ids=str)
def test_recipe_dry_runs(
    path: Path, machine: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: MACHINES[machine]))
    assert cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("== recipe (resolved) ==\n", 1)[1].split("\n== plan ==", 1)[0])
    assert resolved == json.loads(json.dumps(resolved))
    assert resolved["name"] == load(path).name
    assert "== command ==" in out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_recipe_checks_by_name(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: CPU))
    assert cli.main(["check", path.stem]) == 0
    err = capsys.readouterr().err
    hub = load(path).model.hf
    if hub is not None and not (path.parent / hub).exists():  # a hub id: said once, nothing else
        assert err.splitlines() == [
            f"warning: model.hf: {hub} is no local directory, so it is a hub id: "
            "the workers download it (check could not read its config or tokenizer)"
        ]
    else:
        assert err == ""  # shipped recipes carry no setting without effect


def test_bert_is_the_main_job() -> None:
    r = load(ROOT / "recipes" / "bert.yaml")
    assert (r.model.name, r.model.size, r.precision.dtype, r.backend, r.zero.stage) == (
        "bert-mlm",
        "base",
        "auto",
        "deepspeed",
        2,
    )
    assert resolve(r, H100x8).precision.dtype == "bf16"
    assert resolve(r, CPU).precision.dtype == "fp32"  # a CPU without native bf16 would emulate it
    assert resolve(r, Hardware(cpu_count=2, cpu_bf16=True)).precision.dtype == "bf16"


def test_tiny_variant_extends_bert_and_runs_on_two_cpu_processes() -> None:
    assert yaml.safe_load((ROOT / "recipes" / "bert_tiny.yaml").read_text())["extends"] == "bert.yaml"
    plan = resolve(load(ROOT / "recipes" / "bert_tiny.yaml"), CPU)
    assert (plan.device, plan.nproc_per_node, plan.recipe.model.size) == ("cpu", 2, "tiny")
