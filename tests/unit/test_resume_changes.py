"""What a resume may change, decided before anything starts: refused, applied or warned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import cli
from launcher.errors import UserError
from launcher.plan import resume, schedule
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load, to_dict, validate
from launcher.run import launch, preflight
from launcher.rundir import checkpoint
from launcher.rundir.checkpoint import structure
from launcher.rundir.layout import RunDir

CPU = Hardware(gpus=(), cpu_count=4)


def _plan(**sections: Any) -> Plan:
    raw: dict[str, Any] = {
        "name": "t",
        "backend": "deepspeed",
        "model": {"name": "bert-mlm", "size": "tiny", "vocab_size": 512},
        "train": {"micro_batch_size": 4, "max_steps": 100},
        "scheduler": {"warmup_steps": 10},
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "precision": {"dtype": "fp32"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return resolve(validate(raw, "test"), CPU)


def _manifest(plan: Plan, step: int = 40, skipped: int = 0) -> dict[str, Any]:
    """What the checkpointer records about a plan (launcher.worker.checkpointer.Checkpointer._manifest)."""
    return {
        "step": step,
        "skipped_steps": skipped,
        **structure(plan),
        "precision": plan.precision.dtype,
        resume.SIGNATURE_KEY: resume.signature(plan),
        "recipe": to_dict(plan.recipe),
    }


def test_an_unchanged_recipe_resumes_without_a_word() -> None:
    plan = _plan()
    assert resume.check(_manifest(plan), plan, "ckpt") == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"backend": "accelerate"}, "backend deepspeed, this run has accelerate"),
        ({"zero": {"stage": 3}}, "ZeRO stage 0, this run has 3"),
        ({"precision": {"dtype": "bf16"}}, "precision.dtype fp32, this run has bf16"),
        ({"model": {"hidden_size": 256}}, "model hidden_size 128, this run has 256"),
        ({"model": {"vocab_size": 600}}, "model vocab_size 512, this run has 600"),
        ({"data": {"seq_len": 64}}, "data.seq_len 128, this run has 64"),
        ({"data": {"num_samples": 1000}}, "data.num_samples 4096, this run has 1000"),
        ({"data": {"eval_fraction": 0.1}}, "data.eval_fraction 0.05, this run has 0.1"),
        ({"train": {"seed": 7}}, "train.seed 1234, this run has 7"),
        ({"train": {"global_batch_size": 16}}, "global batch size 8, this run has 16"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_changes_the_checkpoint_cannot_take_are_refused_naming_them(
    change: dict[str, Any], named: str
) -> None:
    saved = _manifest(_plan())
    with pytest.raises(UserError) as caught:
        resume.check(saved, _plan(**change), "ckpt")
    message = str(caught.value)
    assert message.startswith("cannot resume from ckpt: the checkpoint was written with ")
    assert named in message


def test_every_refused_difference_is_named_at_once() -> None:
    saved = _manifest(_plan())
    with pytest.raises(UserError) as caught:
        resume.check(saved, _plan(precision={"dtype": "bf16"}, data={"seq_len": 64}), "ckpt")
    assert "precision.dtype" in str(caught.value)
    assert "seq_len" in str(caught.value)


def test_a_checkpoint_without_a_signature_is_checked_on_its_saved_recipe() -> None:
    saved = _manifest(_plan())
    del saved[resume.SIGNATURE_KEY]
    assert resume.check(saved, _plan(), "ckpt") == []
    with pytest.raises(UserError, match="model.hidden_size None, this run has 256"):
        resume.check(saved, _plan(model={"hidden_size": 256}), "ckpt")
    with pytest.raises(UserError, match="precision.dtype fp32, this run has bf16"):
        resume.check(saved, _plan(precision={"dtype": "bf16"}), "ckpt")


def test_optimizer_and_schedule_changes_are_applied_and_the_lr_shown() -> None:
    saved = _manifest(_plan(), step=40, skipped=2)
    lines = resume.check(saved, _plan(optimizer={"lr": 1e-3}, train={"max_steps": 200}), "ckpt")
    assert lines[0] == "applied on resume: optimizer.lr 0.0001 -> 0.001, train.max_steps 100 -> 200"
    # 38 optimizer steps applied (2 skipped): linear decay from step 10 to max_steps.
    before = 1e-4 * (1 - (38 - 10) / (100 - 10))
    after = 1e-3 * (1 - (38 - 10) / (200 - 10))
    assert lines[1] == (
        f"the LR schedule continues at optimizer step 38 with the new settings: lr {before:.3g} -> {after:.3g}"
    )


def test_loss_scale_settings_are_kept_from_the_checkpoint_and_warned() -> None:
    saved = _manifest(_plan())
    lines = resume.check(saved, _plan(precision={"loss_scale": {"window": 50}}), "ckpt")
    assert lines == [
        "warning: precision.loss_scale.window: kept from the checkpoint on resume "
        "(the loss scaler restores its scale and counters); start afresh to change them"
    ]


def test_where_the_run_lives_is_not_a_change() -> None:
    saved = _manifest(_plan())
    moved = _plan(name="elsewhere", logging={"dir": "/somewhere/else"}, checkpoint={"resume": "auto"})
    assert resume.check(saved, moved, "ckpt") == []


class _Scheduler:
    """The parts of a torch LambdaLR that continue_on reads and writes."""

    def __init__(self, groups: list[dict[str, Any]], last_epoch: int) -> None:
        self.optimizer = type("Opt", (), {"param_groups": groups})()
        self.last_epoch = last_epoch
        self.base_lrs = [g["lr"] for g in groups]


def test_continue_on_overrides_what_loading_restored() -> None:
    recipe = validate(
        {
            "name": "t",
            "model": {"name": "tiny-mlp"},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.8, 0.9], "eps": 1e-6},
            "scheduler": {"name": "cosine", "warmup_steps": 0},
            "train": {"micro_batch_size": 4, "max_steps": 10},
        },
        "test",
    )
    restored = [
        {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
        {"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    ]
    sched = _Scheduler(restored, last_epoch=5)
    schedule.continue_on(sched, recipe)
    expected_lr = 1e-3 * schedule.factor(recipe)(5)
    assert [g["lr"] for g in restored] == [expected_lr, expected_lr]
    assert [g["weight_decay"] for g in restored] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in restored)
    assert sched.base_lrs == [1e-3, 1e-3]


def test_another_world_size_is_not_refused_the_workers_reshard() -> None:
    saved = _manifest(_plan())
    # One rank with the checkpoint's global batch of 8 (what `--resume` pins: keep_global_batch).
    one_rank = _plan(
        launch={"device": "cpu", "nproc_per_node": 1},
        train={"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 100},
    )
    assert resume.check(saved, one_rank, "ckpt") == [
        "applied on resume: launch.nproc_per_node 2 -> 1, train.global_batch_size None -> 8"
    ]


def test_a_new_world_size_keeps_the_global_batch_and_the_micro_batch() -> None:
    saved = _manifest(_plan())  # 2 ranks x micro-batches of 4: a global batch of 8
    assert resume.keep_global_batch(saved, 2, []) is None  # the same world size: nothing to keep
    assert resume.keep_global_batch(saved, 1, []) == {
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.grad_accum": None,
    }
    # A batch key given on resume is the user's decision: nothing is pinned.
    assert resume.keep_global_batch(saved, 1, ["train.grad_accum=2"]) is None
    with pytest.raises(UserError) as caught:
        resume.keep_global_batch(saved, 4, [])
    assert "splits over world sizes 1 and 2 only; or give train.micro_batch_size one of 1 and 2" in str(
        caught.value
    )


def test_a_global_batch_that_does_not_split_is_refused_naming_the_sizes_that_would() -> None:
    saved = _manifest(_plan())
    saved[resume.SIGNATURE_KEY]["global batch size"] = 16
    saved["recipe"]["train"]["micro_batch_size"] = 2
    with pytest.raises(UserError) as caught:
        resume.keep_global_batch(saved, 3, [])
    assert str(caught.value).startswith(
        "cannot resume on 3 ranks: the checkpoint's global batch of 16 samples in micro-batches of 2 "
        "splits over world sizes 1, 2, 4 and 8 only"
    )
    saved[resume.SIGNATURE_KEY]["global batch size"] = 12
    with pytest.raises(UserError) as caught:
        resume.keep_global_batch(saved, 4, [])
    assert "splits over world sizes 1, 2, 3 and 6 only; or give train.micro_batch_size one of 1 and 3" in str(
        caught.value
    )


def test_the_lr_line_appears_on_a_resume_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's recipe names its data relative to the recipe's folder, which a resume started
    elsewhere (a Slurm job's directory, another shell) may not resolve: the schedule still compares."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "corpus.txt").write_text("one line of text\n" * 200)
    monkeypatch.chdir(project)
    raw = {"source": "recipe.yaml", "data": {"kind": "text", "paths": ["data/corpus.txt"]}}
    saved = _manifest(_plan(**raw), step=40)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = _plan(**{**raw, "source": str(project / "recipe.yaml")}, optimizer={"lr": 1e-3})
    lines = resume.check(saved, resumed, "ckpt")
    assert lines[0] == "applied on resume: optimizer.lr 0.0001 -> 0.001"
    before, after = 1e-4 * (1 - (40 - 10) / (100 - 10)), 1e-3 * (1 - (40 - 10) / (100 - 10))
    assert lines[1] == (
        f"the LR schedule continues at optimizer step 40 with the new settings: lr {before:.3g} -> {after:.3g}"
    )


# --------------------------------------------------------------------------- paths written another way


def _project(tmp_path: Path, tiny_models: Path) -> Path:
    """A user's folder: bert_finetune_tiny's chain with its model beside it (model.hf: models/tiny-bert),
    a tokenizer folder `tok` and weights `weights` to start from."""
    from launcher.recipe import shipped
    from launcher.recipe.files import RECIPES_DIR

    project = (tmp_path / "project").resolve()
    shipped.copy(RECIPES_DIR / "bert_finetune_tiny.yaml", f"{project}/")
    shutil.copytree(tiny_models / "tiny-bert", project / "models" / "tiny-bert")
    shutil.copytree(tiny_models / "tiny-bert", project / "tok")
    (project / "weights").mkdir()
    (project / "weights" / "model.safetensors").write_bytes(b"")
    return project


def _user_plan(project: Path, *overrides: str) -> Plan:
    where = f"logging.dir={project.parent / 'runs'}"
    return resolve(
        load(project / "bert_finetune_tiny.yaml", [where, "model.init_from=weights", *overrides]), CPU
    )


def _resumed(plan: Plan) -> Plan:
    """The plan `mplaunch --resume RUN_DIR` makes: from RUN_DIR/recipe.yaml as the launcher writes it."""
    run_dir = preflight.prepare_run_dir(plan)
    where = {"logging.dir": str(run_dir.parent), "name": run_dir.name}
    return resolve(load(run_dir / "recipe.yaml", values=where), CPU)


def test_a_plain_resume_says_nothing_of_paths_written_relative_to_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: Path
) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    project = _project(tmp_path, tiny_models)
    first = _user_plan(project, "data.tokenizer=tok")
    saved = _manifest(first)
    monkeypatch.chdir(tmp_path)  # resumed from another directory
    resumed = _resumed(first)
    r = resumed.recipe
    assert (r.model.hf, r.model.init_from, r.data.tokenizer) == (  # the same places, written absolute
        str(project / "models" / "tiny-bert"),
        str(project / "weights"),
        str(project / "tok"),
    )
    assert resume.check(saved, resumed, "ckpt") == []
    # The recipe itself again, after a resume wrote checkpoints whose recipe names the absolute paths.
    assert resume.check(_manifest(resumed), first, "ckpt") == []
    # A checkpoint of an earlier mplaunch records no locations: its recipe as written names the same places.
    del saved[resume.SIGNATURE_KEY][resume.LOCATIONS_KEY]
    assert resume.check(saved, resumed, "ckpt") == []


def test_a_path_that_points_elsewhere_on_resume_is_listed_where_it_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: Path
) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    project = _project(tmp_path, tiny_models)
    saved = _manifest(_user_plan(project, "data.tokenizer=tok"))
    shutil.copytree(project / "tok", project / "tok2")  # the same vocabulary, another folder
    moved = _user_plan(project, "data.tokenizer=tok2")
    assert resume.check(saved, moved, "ckpt") == [
        f"applied on resume: data.tokenizer {project / 'tok'} -> {project / 'tok2'}"
    ]
    del saved[resume.SIGNATURE_KEY][resume.LOCATIONS_KEY]
    assert resume.check(saved, moved, "ckpt") == [
        f"applied on resume: data.tokenizer tok -> {project / 'tok2'}"
    ]


# --------------------------------------------------------------------------- max_steps at or below the steps done


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[Plan]]:
    """A recipe whose run has a checkpoint at step 100 (its max_steps) and FINISHED; the workers
    that a start would launch, recorded instead."""
    raw = {
        "name": "t",
        "model": {"name": "bert-mlm", "size": "tiny", "vocab_size": 512},
        "train": {"micro_batch_size": 4, "max_steps": 100},
        "scheduler": {"warmup_steps": 10},
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "precision": {"dtype": "fp32"},
        "logging": {"dir": str(tmp_path / "runs"), "progress": False},
    }
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    plan = resolve(load(recipe), CPU)
    step = checkpoint.step_dir(RunDir.from_plan(plan).checkpoints, 100)
    step.mkdir(parents=True)
    (step / checkpoint.MANIFEST).write_text(json.dumps(_manifest(plan, step=100)))
    RunDir.from_plan(plan).write_finished(100)
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: CPU))
    started: list[Plan] = []

    class Workers:
        def __init__(self, plan: Plan, lock: object = None) -> None:
            started.append(plan)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(launch, "Workers", Workers)
    return recipe, Path(plan.run_dir), started


def test_a_max_steps_below_the_steps_done_is_refused_in_one_line(
    trained: tuple[Path, Path, list[Plan]], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, run_dir, started = trained
    refused = (
        f"error: {run_dir}: the run already has 100 steps, and train.max_steps is 50 (hint: train.max_steps "
        "must exceed 100 to train more, or use another name to start afresh; nothing was started)"
    )
    assert cli.main([str(recipe), "train.max_steps=50", "optimizer.lr=1e-3"]) == 2
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("", [refused])
    # A run stopped at its step-100 checkpoint, before FINISHED, the same.
    (run_dir / "FINISHED").unlink()
    assert cli.main([str(recipe), "train.max_steps=50"]) == 2
    assert capsys.readouterr().err.splitlines() == [refused]
    assert started == []


def test_a_finished_run_says_only_that_it_finished(
    trained: tuple[Path, Path, list[Plan]], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, run_dir, started = trained
    assert cli.main([str(recipe), "optimizer.lr=1e-3"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"mplaunch: {run_dir} already finished 100 steps; nothing to do "
        "(raise train.max_steps to train further, or use another name)"
    ]
    assert err == ""
    assert started == []
    # Raised: the changes are applied, and the run trains on.
    assert cli.main([str(recipe), "train.max_steps=200", "optimizer.lr=1e-3"]) == 0
    err = capsys.readouterr().err
    assert "applied on resume: optimizer.lr 0.0001 -> 0.001, train.max_steps 100 -> 200" in err
    assert [p.recipe.train.max_steps for p in started] == [200]
