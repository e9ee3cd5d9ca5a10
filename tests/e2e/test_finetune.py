"""Bring your own model and data: tiny Hugging Face models fine-tuned on 2 CPU ranks with every task
on both backends, exported, and loaded back with `from_pretrained`, as a user would (README,
"Bring your own model and data").

Each (task, backend) trains STEPS steps once, in a module-scoped fixture. The export's logits on a
fixed batch are compared with those of the model the run trained, rebuilt by launcher.worker.model_setup
and loaded with the checkpoint's consolidated fp32 weights: exactly equal in fp32, and close after
LoRA adapters are merged into the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.plan.resolve import Plan
from launcher.worker import export, model_setup
from tests.runs import ROOT, explain, mplaunch

STEPS = 2
DATA = ROOT / "recipes" / "data"
QUIET = {
    "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    "checkpoint": {"every_steps": 0},
}
TASKS: dict[str, dict[str, Any]] = {
    "sequence-classification": {
        "model": {"hf": "tiny-bert", "num_labels": 4},
        "data": {"kind": "jsonl", "paths": [str(DATA / "topics.jsonl")], "seq_len": 32},
    },
    "masked-lm": {"model": {"hf": "tiny-bert"}, "data": {"kind": "text", "paths": [str(DATA / "corpus.txt")], "seq_len": 32}},
    "causal-lm": {"model": {"hf": "tiny-gpt2"}, "data": {"kind": "text", "paths": [str(DATA / "corpus.txt")], "seq_len": 32}},
    "sft": {
        "model": {"hf": "tiny-llama", "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"kind": "jsonl", "paths": [str(DATA / "questions.jsonl")], "seq_len": 48},
        "train": {"activation_checkpointing": True},
    },
}  # fmt: skip


def _recipe(tmp: Path, models: Path, task: str, backend: str) -> Path:
    import yaml

    spec = TASKS[task]
    name = f"{task}-{backend}"
    body: dict[str, Any] = {
        "name": name,
        "model": {**spec["model"], "hf": str(models / spec["model"]["hf"])},
        "data": {"task": task, **spec["data"]},
        "train": {
            "micro_batch_size": 4,
            "global_batch_size": 16,
            "max_steps": STEPS,
            **spec.get("train", {}),
        },
        "optimizer": {"lr": 1e-3},
        "precision": {"dtype": "fp32"},
        "backend": backend,
        "launch": {"device": "cpu", "nproc_per_node": 2},
        **QUIET,
        "logging": {**QUIET["logging"], "dir": str(tmp / "runs")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module", autouse=True)
def _module_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401  (torch.load of a DeepSpeed checkpoint imports it)
        import transformers.models.bert.modeling_bert  # noqa: F401  (their import sets TORCHINDUCTOR_CACHE_DIR)
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        yield


Trained = Callable[[str, str], tuple[Path, Path, str]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Trained:
    done: dict[tuple[str, str], tuple[Path, Path, str]] = {}

    def get(task: str, backend: str) -> tuple[Path, Path, str]:
        if (task, backend) not in done:
            tmp = tmp_path_factory.mktemp(f"{task}-{backend}")
            result = mplaunch(str(_recipe(tmp, tiny_models, task, backend)))
            assert result.returncode == 0, explain(result)
            run_dir, out = tmp / "runs" / f"{task}-{backend}", tmp / "export"
            exported = mplaunch("export", str(run_dir), "--out", str(out))
            assert exported.returncode == 0, explain(exported)
            done[task, backend] = (run_dir, out, result.stdout + exported.stdout)
        return done[task, backend]

    return get


def _batch(plan: Plan) -> dict[str, torch.Tensor]:
    from launcher.worker import data

    tokens = data.load_tokens(plan, 0, lambda: None)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed).train[:4]
    batch = data.Batches(tokens, rows, plan, 0, evaluation=True).collate(rows, epoch=0)
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
@pytest.mark.parametrize("task", list(TASKS))
def test_fine_tune_export_and_load_with_from_pretrained(trained: Trained, task: str, backend: str) -> None:
    import transformers

    run_dir, out, stdout = trained(task, backend)
    plan = Plan.from_json((run_dir / "plan.json").read_text())
    auto = getattr(transformers, export._auto_class(plan) or "")
    loaded = auto.from_pretrained(str(out)).eval()
    assert transformers.AutoTokenizer.from_pretrained(str(out)) is not None
    reference, _ = model_setup.model_for(plan, load_init=False)
    path, _ = export.pick(export.RunDir.of(run_dir), None)
    reference.load_state_dict(export.consolidate(plan, path))
    reference.eval()
    batch = _batch(plan)
    with torch.no_grad():
        got = loaded(**batch).logits
        want = model_setup.inner(reference)(**batch).logits
    if plan.recipe.model.lora.rank:
        assert "LoRA rank 4" in stdout
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(got, want)
    if task == "sequence-classification":
        assert got.shape == (4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
def test_lora_adapters_export_alone_and_load_onto_the_base(
    trained: Trained, backend: str, tmp_path: Path
) -> None:
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir, merged, _ = trained("sft", backend)
    result = mplaunch("export", str(run_dir), "--lora", "adapter", "--out", str(tmp_path / "adapter"))
    assert result.returncode == 0, explain(result)
    plan = Plan.from_json((run_dir / "plan.json").read_text())
    assert f"base model: {plan.hf_dir}" in result.stdout
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)  # the adapters, no base weight
    base = transformers.AutoModelForCausalLM.from_pretrained(plan.hf_dir).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    batch = _batch(plan)
    with torch.no_grad():
        untrained = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        got, want = adapted(**batch).logits, plain(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (untrained - want).abs().max() > 1e-3  # the adapters trained: the comparison can fail


@pytest.mark.slow
def test_an_adapter_export_of_a_run_without_lora_is_one_line(trained: Trained, tmp_path: Path) -> None:
    run_dir, _, _ = trained("causal-lm", "deepspeed")
    result = mplaunch("export", str(run_dir), "--lora", "adapter", "--out", str(tmp_path / "adapter"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --lora adapter: the run trained no LoRA adapters (model.lora.rank is 0); export without it"
    ]
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    ("task", "change", "said"),
    [
        (
            "sft",
            {"model": {"lora": {"rank": 4, "target_modules": ["q_proj", "qproj"]}}},
            "'qproj' matches no linear layer",
        ),
        ("causal-lm", {"data": {"task": "masked-lm"}}, "masks tokens with [MASK], and the tokenizer in"),
    ],
    ids=["lora-target", "gpt2-masked-lm"],
)
def test_what_the_model_folder_rules_out_stops_the_launch_before_any_worker(
    tmp_path: Path, tiny_models: Path, task: str, change: dict[str, Any], said: str
) -> None:
    # These failed in the workers, seconds into the run; the plan reads them from the model folder.
    import yaml

    path = _recipe(tmp_path, tiny_models, task, "deepspeed")
    body = yaml.safe_load(path.read_text())
    for section, values in change.items():
        body[section] = {**body[section], **values}
    path.write_text(yaml.safe_dump(body))
    for args in (["check", str(path)], [str(path)]):
        result = mplaunch(*args, timeout=120)
        assert result.returncode == 2, explain(result)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: "), line
        assert said in line, line
    assert not (tmp_path / "runs").exists()  # no run directory, no worker
