"""The command line: verbs, exit codes, one-line errors, the dry run, and the frozen flag list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

import launcher
from launcher import cli
from launcher.plan.hardware import Gpu, Hardware
from launcher.run import launch

ROOT = Path(__file__).resolve().parents[2]
BERT = str(ROOT / "recipes" / "bert.yaml")
CPU = Hardware(cpu_count=4, cpu_bf16=True)  # precision auto: bf16
H100x8 = Hardware(
    gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30) for i in range(8)), cpu_count=64
)
LOSS_SCALE_KNOBS = (
    "enabled",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "consecutive_hysteresis",
    "min_loss_scale",
)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> object:
    """Fake the probed machine: `machine(H100x8)`; CPU-only until told otherwise."""

    def use(hw: Hardware) -> None:
        monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: hw))

    use(CPU)
    return use


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Replace launcher.run.launch.run so that nothing can start; records the plans it was given."""
    started: list[object] = []
    monkeypatch.setattr(launch, "run", lambda plan: started.append(plan) or 0)
    return started


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def section(text: str, header: str) -> str:
    after = text.split(f"== {header} ==\n", 1)[1]
    return after.split("\n== ", 1)[0]


# --------------------------------------------------------------------------- check


def test_check_ok(capsys: pytest.CaptureFixture[str], machine: object) -> None:
    code, out, err = run(capsys, "check", BERT)
    assert code == 0
    assert err == []
    assert (
        out
        == f"ok: {BERT} (global_batch_size 256 = micro_batch_size 32 x grad_accum 8 x world_size 1 (1 node x 1 proc))\n"
    )


def test_check_typo_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], machine: object) -> None:
    code, out, err = run(capsys, "check", BERT, "train.micro_bach_size=8")
    assert (code, out) == (2, "")
    assert err == ["error: override train.micro_bach_size: unknown key; did you mean train.micro_batch_size?"]


def test_check_reports_every_problem_one_line_each(
    capsys: pytest.CaptureFixture[str], machine: object
) -> None:
    code, out, err = run(
        capsys, "check", BERT, "zero.stage=yes", "train.max_steps='8'", "precision.dtpye=bf16"
    )
    assert (code, out) == (2, "")
    assert err == [
        "error: override train.max_steps: expected an integer, got '8' (a string)",
        "error: override precision.dtpye: unknown key; did you mean precision.dtype?",
        "error: override zero.stage: expected one of 0, 1, 2, 3, got true (YAML reads yes/no/on/off as true/false)",
        "error: not checked until the problems above are fixed: the ZeRO settings, the devices and precision",
    ]


def test_check_prints_warnings_and_still_passes(capsys: pytest.CaptureFixture[str], machine: object) -> None:
    code, _, err = run(capsys, "check", BERT, "precision.loss_scale.window=10")
    assert code == 0
    assert err == [
        "warning: precision.loss_scale.window: has no effect with bf16 (only fp16 scales the loss)"
    ]


def test_check_fails_for_what_this_machine_cannot_run(
    capsys: pytest.CaptureFixture[str], machine: object
) -> None:
    code, out, err = run(capsys, "check", BERT, "precision.dtype=fp16")
    assert (code, out) == (2, "")
    assert err[0].startswith("error: precision.dtype: fp16 is not supported by DeepSpeed on CPU")


def test_check_accepts_shipped_names(capsys: pytest.CaptureFixture[str], machine: object) -> None:
    assert run(capsys, "check", "bert_tiny")[0] == 0
    assert run(capsys, "check", "bert.yaml")[0] == 0


def test_a_mistyped_path_is_not_taken_for_the_shipped_recipe(
    capsys: pytest.CaptureFixture[str], machine: object
) -> None:
    code, out, err = run(capsys, "check", "/nonexistent/dir/bert.yaml")
    assert (code, out) == (2, "")
    assert err == [
        "error: /nonexistent/dir/bert.yaml: recipe file not found (hint: the shipped recipe of that name is `bert`)"
    ]


def test_check_explain_lists_every_key(capsys: pytest.CaptureFixture[str], machine: object) -> None:
    from launcher.recipe.schema import all_keys

    code, out, _ = run(capsys, "check", BERT, "--explain")
    assert code == 0
    assert out.startswith("ok: ")
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == all_keys()
    assert "Samples per rank per forward pass." in out


def test_explain_needs_no_recipe_and_can_print_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.recipe.reference import reference_markdown

    code, out, _ = run(capsys, "check", "--explain", "--markdown")
    assert code == 0
    assert out == reference_markdown() + "\n"
    code, out, err = run(capsys, "check")
    assert code == 2
    assert err == [
        "error: mplaunch check: the following arguments are required: recipe (hint: see mplaunch check --help)"
    ]


# --------------------------------------------------------------------------- dry run


def test_acceptance_dry_run_on_a_gpu_machine(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object]
) -> None:
    machine(H100x8)  # type: ignore[operator]
    code, out, err = run(capsys, BERT, "--dry-run", "zero.stage=3", "precision.dtype=fp16")
    assert code == 0
    assert err == []
    assert no_launch == []
    ds = json.loads(section(out, "DeepSpeed config"))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
    }
    assert ds["bf16"] == {"enabled": False}
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (256, 32, 1)
    assert ds["gradient_clipping"] == 1.0
    assert (
        "global_batch_size 256 = micro_batch_size 32 x grad_accum 1 x world_size 8 (1 node x 8 procs)" in out
    )
    assert "--nproc-per-node=8" in section(out, "command")


def test_acceptance_dry_run_on_this_cpu_machine_shows_the_plan_then_exits_2(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object]
) -> None:
    # The user asked to see the plan and sees all of it; the exit code still
    # says what `mplaunch` without --dry-run would do here: refuse, exit 2.
    code, out, err = run(capsys, BERT, "--dry-run", "zero.stage=3", "precision.dtype=fp16")
    assert code == 2
    assert no_launch == []
    ds = json.loads(section(out, "DeepSpeed config"))
    assert ds["zero_optimization"]["stage"] == 3
    assert set(LOSS_SCALE_KNOBS) <= set(ds["fp16"])
    assert ds["fp16"]["enabled"] is True
    assert "DS_ACCELERATOR=cpu" in section(out, "environment")
    assert err == [
        "error: this machine cannot run the plan above: precision.dtype: fp16 is not supported by DeepSpeed on CPU; "
        "use precision.dtype=bf16, or backend=accelerate (which scales fp16 on CPU)"
    ]


def test_dry_run_with_a_recipe_error_prints_no_plan(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object]
) -> None:
    code, out, err = run(capsys, BERT, "--dry-run", "train.global_batch_size=100")
    assert (code, out) == (2, "")
    assert err == [
        "error: train.global_batch_size: 100 is not divisible by micro_batch_size 32 x world_size 1 (= 32)"
    ]


def test_dry_run_prints_every_part_and_starts_nothing(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object]
) -> None:
    code, out, err = run(capsys, "--dry-run", BERT)  # flags may come first
    assert code == 0
    assert err == []
    assert no_launch == []
    assert out.startswith(
        "mplaunch dry run: nothing is started\n== recipe (resolved) ==\nname: bert-base-mlm\n"
    )
    for header in ("plan", "DeepSpeed config", "environment", "command"):
        assert f"== {header} ==" in out
    assert "set by torchrun for each rank: RANK=0 LOCAL_RANK=0 WORLD_SIZE=1" in out


def test_run_hands_the_plan_to_launch(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object]
) -> None:
    code, _, err = run(capsys, BERT, "train.max_steps=20", "precision.loss_scale.window=5")
    assert code == 0
    assert len(no_launch) == 1
    assert no_launch[0].recipe.train.max_steps == 20  # type: ignore[attr-defined]
    assert "warning: precision.loss_scale.window: has no effect with bf16 (only fp16 scales the loss)" in err
    assert all(line.startswith("warning: ") for line in err)


# --------------------------------------------------------------------------- usage errors, help, version


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([BERT, "--bogus"], "error: mplaunch: unrecognized arguments: --bogus (hint: see mplaunch --help)"),
        ([BERT, "train.max_steps"], "error: override 'train.max_steps': expected dotted.key=value"),
        (["chekc", BERT], "error: chekc: recipe file not found (hint: did you mean `mplaunch check`?)"),
        (
            ["nope.yaml"],
            "error: nope.yaml: recipe file not found (hint: shipped recipes: bert, bert_finetune,",
        ),
        ([BERT, "launch.nnodes=2"], "error: launch.nnodes: 2 nodes need --slurm; a local run uses one node"),
        ([BERT, "name=" + "a" * 300], "error: override name: string should have at most 128 characters"),
        (
            [BERT, "train.seed=100000000000000000000000"],
            "error: override train.seed: expected a value < 2**63 (torch's 64-bit integers hold no more)",
        ),
        (
            [BERT, "model.hidden_size=100000000000000000000"],
            "error: override model.hidden_size: expected a value < 2**63",
        ),
        (
            [BERT, "data.num_samples=100000000000000000000"],
            "error: override data.num_samples: expected a value < 2**63",
        ),
        (
            [BERT, "logging.dir=/etc/passwd"],
            "error: override logging.dir: /etc/passwd is a file, not a directory",
        ),
        (["recipes", "--copy", "x.yaml"], "error: mplaunch recipes: --copy needs a recipe name"),
        (["env", "extra"], "error: mplaunch env: unrecognized arguments: extra"),
        ([], "error: mplaunch: the following arguments are required: recipe"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], machine: object, no_launch: list[object], argv: list[str], line: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out, no_launch) == (2, "", [])
    assert len(err) == 1, err
    assert err[0].startswith(line), err


@pytest.mark.parametrize(
    ("argv", "usage"), [(["--help"], "usage: mplaunch "), (["check", "-h"], "usage: mplaunch check")]
)
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str], usage: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(usage)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == f"mplaunch {launcher.__version__}\n"


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def test_run_parser_flags_are_frozen() -> None:
    # Settings belong in the recipe and reach the command line as dotted
    # overrides (train.max_steps=20); a flag per knob is what this prevents.
    # A new launcher-level flag is a design decision: add it here on purpose.
    # Each Slurm flag is the override of one recipe key (cli.SLURM_FLAGS).
    slurm_flags = {"--slurm", "--slurm-template", *(flag for flag, *_ in cli.SLURM_FLAGS)}
    assert slurm_flags == {
        "--slurm", "--slurm-template", "--nodes", "--partition", "--time", "--account", "--qos", "--gpus-per-node",
    }  # fmt: skip
    assert _flags(cli._run_parser()) - slurm_flags == {"-h", "--help", "--dry-run", "--resume", "--version"}


def test_export_flags_are_frozen() -> None:
    # `mplaunch export` reads everything else from the run directory (plan.json, the manifest).
    assert _flags(cli._export_parser()) == {"-h", "--help", "--step", "--dtype", "--lora", "--out", "--force"}


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for verb in ("check", "env", "recipes", "plan", "report", "parity", "export"):
        assert f"mplaunch {verb}" in out, verb


# --------------------------------------------------------------------------- env


def test_env_without_torch(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    code, out, _ = run(capsys, "env")
    assert code == 0
    assert out.splitlines()[-1] == "cuda          unknown (torch is not installed)"


# --------------------------------------------------------------------------- recipes


def test_recipes_lists_the_shipped_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "recipes")
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert code == 0
    # A name starts each entry; a wrapped description continues on indented lines.
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == shipped
    assert "BERT-base masked-LM pretraining" in out


def test_recipes_prints_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "recipes", "bert_tiny")
    assert code == 0
    assert out == (ROOT / "recipes" / "bert_tiny.yaml").read_text()


def test_recipes_copy_brings_the_chain_and_data_along(
    capsys: pytest.CaptureFixture[str], machine: object, tmp_path: Path
) -> None:
    dest = tmp_path / "mine.yaml"
    code, out, _ = run(capsys, "recipes", "bert_tiny", "--copy", str(dest))
    assert code == 0
    assert dest.read_text() == (ROOT / "recipes" / "bert_tiny.yaml").read_text()
    assert (tmp_path / "bert.yaml").read_text() == (ROOT / "recipes" / "bert.yaml").read_text()
    assert (tmp_path / "data" / "corpus.txt").is_file()
    assert out.count("copied ") == 3
    assert run(capsys, "check", str(dest))[0] == 0  # the copy loads on its own


def test_recipes_copy_into_a_directory_shares_identical_bases(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "recipes", "bert", "--copy", str(tmp_path))[0] == 0
    code, out, _ = run(capsys, "recipes", "bert_tiny", "--copy", str(tmp_path))
    assert code == 0
    assert out.strip() == f"copied {ROOT / 'recipes' / 'bert_tiny.yaml'} -> {tmp_path / 'bert_tiny.yaml'}"


def test_recipes_copy_refuses_to_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "bert.yaml").write_text("# my edited base\n")
    code, out, err = run(capsys, "recipes", "bert_tiny", "--copy", str(tmp_path))
    assert (code, out) == (2, "")
    assert err == [f"error: {tmp_path / 'bert.yaml'}: already exists; nothing was copied"]
    assert not (tmp_path / "bert_tiny.yaml").exists()
    assert (tmp_path / "bert.yaml").read_text() == "# my edited base\n"
    # the recipe itself is never overwritten, even with the same content
    assert run(capsys, "recipes", "bert", "--copy", str(tmp_path / "b.yaml"))[0] == 0
    assert run(capsys, "recipes", "bert", "--copy", str(tmp_path / "b.yaml"))[0] == 2


def test_recipes_copy_to_a_new_folder_creates_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # A trailing slash names a folder, created with its parents; not a file called "dir".
    code, _, _ = run(capsys, "recipes", "bert_tiny", "--copy", f"{tmp_path}/new/dir/")
    assert code == 0
    assert (tmp_path / "new" / "dir" / "bert_tiny.yaml").is_file()
    assert not (tmp_path / "new" / "dir").is_file()
    assert run(capsys, "check", str(tmp_path / "new" / "dir" / "bert_tiny.yaml"))[0] == 0
