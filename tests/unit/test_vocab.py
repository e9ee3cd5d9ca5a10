"""The plan knows the vocabulary the run will have, before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.plan import vocab
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import prepare_vocab, resolve
from launcher.recipe.schema import load, validate

ROOT = Path(__file__).resolve().parents[2]
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


def _records_recipe(kind: str, path: Path, **data: object):
    raw = {
        "name": "t",
        "model": {"name": None, "target": "pkg.mod:build"},
        "data": {"kind": kind, "paths": [str(path)], **data},
        "train": {"micro_batch_size": 4},
    }
    return validate(raw, "test")


def test_sft_trains_the_tokenizer_on_prompt_and_response(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    rows = [{"q": "What is two?", "a": "Two is 2.", "text": "unused"}, {"q": "Why?", "a": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = _records_recipe("jsonl", path, task="sft", prompt_field="q", response_field="a")
    assert vocab.read_texts(sft, (str(path),)) == ["What is two? Two is 2.", "Why? 7"]
    lm_path = tmp_path / "lm.jsonl"
    lm_path.write_text(json.dumps(rows[0]) + "\n")
    lm = _records_recipe("jsonl", lm_path, task="causal-lm", prompt_field="q", response_field="a")
    assert vocab.read_texts(lm, (str(lm_path),)) == ["unused"]


def test_the_trained_tokenizer_is_keyed_by_the_fields_and_every_file_of_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (disk / "state.json").write_text("{}")
    recipe = _records_recipe("hf-disk", disk)
    before = vocab.trained_dir(recipe, (str(disk),))
    assert before.parent == tmp_path / "cache" / "tokenizers"
    assert vocab.trained_dir(recipe, (str(disk),)) == before
    assert vocab.trained_dir(_records_recipe("hf-disk", disk, text_field="body"), (str(disk),)) != before
    sft = vocab.trained_dir(_records_recipe("hf-disk", disk, task="sft"), (str(disk),))
    assert sft != before
    answer = _records_recipe("hf-disk", disk, task="sft", response_field="answer")
    assert vocab.trained_dir(answer, (str(disk),)) != sft
    (disk / "data-00000-of-00001.arrow").write_bytes(b"rowS")
    assert vocab.trained_dir(recipe, (str(disk),)) != before


def test_a_causal_lm_trains_byte_level_bpe_and_a_masked_lm_wordpiece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers import Tokenizer

    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    gpt2 = load(ROOT / "recipes" / "gpt2_tiny.yaml", [f"logging.dir={tmp_path / 'runs'}"])
    bert = _recipe(tmp_path)
    assert (vocab.algorithm(gpt2), vocab.algorithm(bert)) == ("bpe", "wordpiece")
    paths = (str(ROOT / "recipes" / "data" / "corpus.txt"),)
    assert vocab.trained_dir(gpt2, paths) != vocab.trained_dir(bert, paths)  # one cache entry each
    bpe = Tokenizer.from_file(str(vocab.prepare(gpt2, paths) / vocab.TOKENIZER_FILE))
    wordpiece = Tokenizer.from_file(str(vocab.prepare(bert, paths) / vocab.TOKENIZER_FILE))
    assert json.loads(bpe.to_str())["model"]["type"] == "BPE"
    assert bpe.token_to_id(vocab.END_OF_TEXT) is not None and bpe.token_to_id("[MASK]") is None
    assert wordpiece.token_to_id("[MASK]") is not None
    # Bytes, not words: text the corpus never had comes back exactly, case and accents kept.
    text = "Zürich's naïve CAFÉ — 42 µs, 東京"
    assert bpe.decode(bpe.encode(text).ids) == text
    assert wordpiece.decode(wordpiece.encode(text).ids) != text  # lowercased, [UNK] for unseen characters
