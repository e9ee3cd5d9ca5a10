"""model.hf, model.init_from and the per-record tasks, as `check` sees them (light side).

The tiny model directories come from recipes/models/make_tiny.py, saved once per session
(tests/conftest.py `tiny_models`), the way a user saves a model with save_pretrained.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from launcher.errors import UserError
from launcher.plan import hf_dir
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe import schema as recipe
from tests.runs import ROOT

CPU = Hardware(gpus=(), cpu_count=2)


def _recipe(tmp: Path, **sections: object) -> Path:
    body = {"name": "hf", "logging": {"dir": str(tmp / "runs")}, "train": {"micro_batch_size": 4}, **sections}
    path = tmp / "hf.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _plan(path: Path, *overrides: str):
    return resolve(recipe.load(path, list(overrides)), CPU)


def _errors(path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as err:
        _plan(path, *overrides)
    return str(err.value)


def _classifier(tmp: Path, models: Path, **model: object) -> Path:
    return _recipe(
        tmp,
        model={"hf": str(models / "tiny-bert"), "num_labels": 4, **model},
        data={"task": "sequence-classification", "kind": "jsonl", "paths": [str(ROOT / "recipes/data/topics.jsonl")],
              "seq_len": 32},
    )  # fmt: skip


def test_a_local_directory_resolves_its_tokenizer_vocabulary_and_parameter_count(
    tmp_path, tiny_models
) -> None:
    plan = _plan(_classifier(tmp_path, tiny_models))
    config = json.loads((tiny_models / "tiny-bert" / "config.json").read_text())
    assert plan.hf_dir == str(tiny_models / "tiny-bert")
    assert plan.tokenizer_dir == plan.hf_dir  # the model's own tokenizer
    assert plan.vocab_size == config["vocab_size"]
    assert plan.shape is None
    import safetensors.numpy  # the count from the headers equals the tensors' elements (numpy: no torch here)

    tensors = safetensors.numpy.load_file(str(tiny_models / "tiny-bert" / "model.safetensors"))
    assert plan.num_params == sum(t.size for t in tensors.values())
    row = next(line for line in plan.describe().splitlines() if line.startswith("model "))
    assert "AutoModelForSequenceClassification.from_pretrained" in row and f"{plan.num_params:,}" in row


@pytest.mark.parametrize(
    ("model", "task"), [("tiny-bert", "masked-lm"), ("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")]
)
def test_task_auto_follows_the_architecture(tmp_path, tiny_models, model, task) -> None:
    path = _recipe(tmp_path, model={"hf": str(tiny_models / model)}, data={"kind": "text",
                   "paths": [str(ROOT / "recipes/data/corpus.txt")], "seq_len": 32})  # fmt: skip
    assert _plan(path).model.task == task


def test_an_architecture_without_a_task_needs_data_task(tmp_path, tiny_models) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_models / "tiny-bert", bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    path = _recipe(tmp_path, model={"hf": str(bare)})
    assert "data.task: auto cannot tell what" in _errors(path)
    assert _plan(path, "data.task=masked-lm").model.task == "masked-lm"


def test_directory_problems_are_one_line_each(tmp_path, tiny_models) -> None:
    path = _classifier(tmp_path, tiny_models)
    assert "model.hf: directory not found" in _errors(path, f"model.hf={tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _errors(path, f"model.hf={empty}")
    (empty / "config.json").write_text("{not json")
    assert "is not valid JSON" in _errors(path, f"model.hf={empty}")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_models / "tiny-bert", no_weights)
    (no_weights / "model.safetensors").unlink()
    message = _errors(path, f"model.hf={no_weights}")
    assert "has no weights" in message and "model.weights=random" in message
    assert _plan(path, f"model.hf={no_weights}", "model.weights=random").num_params is None


def test_a_config_override_that_resizes_pretrained_weights_is_refused(tmp_path, tiny_models) -> None:
    path = _classifier(tmp_path, tiny_models)
    assert "model.config.num_hidden_layers: changes the shape" in _errors(
        path, "model.config.num_hidden_layers=1"
    )
    plan = _plan(path, "model.config.num_hidden_layers=1", "model.weights=random")
    assert "config overrides {'num_hidden_layers': 1}" in plan.describe()


def test_a_tokenizer_larger_than_the_embeddings_is_refused_at_check(tmp_path, tiny_models) -> None:
    small = tmp_path / "small"
    shutil.copytree(tiny_models / "tiny-bert", small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    message = _errors(_classifier(tmp_path, tiny_models), f"model.hf={small}")
    assert (
        f"has {config['vocab_size']} tokens but" in message and "vocab_size (model.config) is 100" in message
    )


def test_model_keys_that_would_be_ignored_are_refused(tmp_path, tiny_models) -> None:
    path = _classifier(tmp_path, tiny_models)
    assert "model.size: not used by model.hf; override its config as model.config.<key>" in _errors(
        path, "model.size=tiny"
    )
    assert "model.kwargs: only used with model.target" in _errors(path, "model.kwargs.x=1")
    assert "either model.hf or model.target" in _errors(path, "model.target=m:f")
    bert = _recipe(tmp_path)  # the built-in model
    assert "model.config: only used with model.hf" in _errors(bert, "model.config.hidden_size=8")
    assert "model.weights: only used with model.hf" in _errors(bert, "model.weights=random")
    assert "model.num_labels: only used with data.task sequence-classification" in _errors(
        bert, "model.num_labels=3", "data.task=masked-lm"
    )


def test_built_in_models_refuse_tasks_they_are_not_made_for(tmp_path) -> None:
    bert = _recipe(tmp_path, data={"kind": "jsonl", "paths": [str(ROOT / "recipes/data/topics.jsonl")]})
    assert "bert-mlm is a masked-lm model, it cannot train sequence-classification" in _errors(
        bert, "data.task=sequence-classification"
    )
    gpt = _plan(_recipe(tmp_path, model={"name": "gpt2-lm", "size": "tiny"}), "data.task=sft")
    assert gpt.model.task == "sft"


def test_init_from_must_hold_weights(tmp_path, tiny_models) -> None:
    path = _recipe(tmp_path, model={"size": "tiny"})
    assert "model.init_from: directory not found" in _errors(path, f"model.init_from={tmp_path / 'x'}")
    assert "holds none of model.safetensors" in _errors(path, f"model.init_from={tmp_path}")
    plan = _plan(path, f"model.init_from={tiny_models / 'tiny-bert'}")
    assert plan.init_from == str(tiny_models / "tiny-bert")
    assert "fresh optimizer, schedule and step 0" in plan.describe()


def test_a_hub_id_is_passed_through_with_a_warning(tmp_path) -> None:
    path = _recipe(tmp_path, model={"hf": "org/some-model"}, data={"task": "causal-lm"})
    plan = _plan(path)
    assert plan.hf_dir == "org/some-model"
    assert any("is no local directory, so it is a hub id" in w for w in plan.warnings)
    assert hf_dir.locate("./org/some-model", str(path))[1] is True  # an explicit path never is


def test_check_reads_the_directory_without_torch(tmp_path, tiny_models) -> None:
    import subprocess

    path = _classifier(tmp_path, tiny_models)
    code = (
        "import sys; from launcher.cli import main; rc = main(['check', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'tokenizers') if m in sys.modules]; "
        "print('heavy:', heavy); raise SystemExit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
