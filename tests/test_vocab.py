"""The plan knows the vocabulary the run will have, before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import vocab
from launcher.errors import UserError
from launcher.hardware import Hardware
from launcher.plan import prepare_vocab, resolve
from launcher.recipe import load

ROOT = Path(__file__).resolve().parent.parent
CPU = Hardware(cpu_count=2)


def _recipe(tmp_path: Path, *overrides: str):
    return load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path / 'runs'}", *overrides])


def test_a_cold_cache_plans_the_cap_and_a_launch_plans_the_exact_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path)
    cold = resolve(recipe, CPU)
    assert cold.vocab_size == vocab.MAX_TRAINED_VOCAB
    assert "cap" in cold.vocab_source
    prepare_vocab(recipe)  # what a real launch does before resolving
    warm = resolve(recipe, CPU)
    trained = json.loads(next((tmp_path / "cache").rglob("tokenizer.json")).read_text())
    assert warm.vocab_size == len(trained["model"]["vocab"]) < vocab.MAX_TRAINED_VOCAB
    assert warm.shape is not None
    assert warm.shape.vocab_size == warm.vocab_size


def test_model_vocab_size_and_synthetic_data_decide_without_a_tokenizer(tmp_path: Path) -> None:
    assert resolve(_recipe(tmp_path, "model.vocab_size=1234"), CPU).vocab_size == 1234
    synthetic = resolve(_recipe(tmp_path, "data.kind=synthetic", "data.paths=[]"), CPU)
    assert synthetic.vocab_size == 30522  # BERT's own vocabulary


def test_a_tokenizer_directory_gives_its_size(tmp_path: Path) -> None:
    texts = (ROOT / "recipes" / "data" / "corpus.txt").read_text().splitlines()[:100]
    vocab._train_wordpiece(texts, tmp_path / "tok")
    plan = resolve(_recipe(tmp_path, f"data.tokenizer={json.dumps(str(tmp_path / 'tok'))}"), CPU)
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert plan.vocab_size == max(data["model"]["vocab"].values()) + 1
    assert str(tmp_path / "tok") in plan.vocab_source


def test_unreadable_data_is_a_user_error_at_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    recipe = _recipe(tmp_path, "data.kind=jsonl", f"data.paths=[{json.dumps(str(bad))}]")
    with pytest.raises(UserError, match=r"data.paths: .*bad.jsonl:2: record has no field 'text'"):
        prepare_vocab(recipe)
