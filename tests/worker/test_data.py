"""Data: the sample order and masking depend only on (seed, step), files and tokenizers load right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.errors import UserError
from launcher.plan import vocab
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.run import token_cache
from launcher.worker import data

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "recipes" / "data" / "corpus.txt"
CPU = Hardware(cpu_count=2)


def _plan(tmp_path: Path, *overrides: str):
    """The plan as the launcher leaves it for the workers: RUN_DIR/tokenizer in place."""
    plan = resolve(load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", *overrides]), CPU)
    token_cache.place_tokenizer(plan)
    return plan


def _batches(plan, rank: int) -> data.Batches:
    tokens = data.load_tokens(plan, rank, lambda: None)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    return data.Batches(tokens, rows.train, plan, rank)


def _every_row(tokens: data.Tokens) -> torch.Tensor:
    return tokens.ids.take(np.arange(len(tokens.ids)))[0]


def _global_batch(plan, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (input_ids, labels) row of one optimizer step, over all ranks and micro-batches."""
    out = []
    for rank in range(plan.world_size):
        for mb in _batches(plan, rank).for_step(step):
            out += list(zip(mb["input_ids"], mb["labels"], strict=True))
    return out


def _as_set(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> set[bytes]:
    return {ids.numpy().tobytes() + labels.numpy().tobytes() for ids, labels in rows}


def test_the_global_batch_does_not_depend_on_how_it_is_split(tmp_path: Path) -> None:
    # 2 ranks x micro 8 x accum 2, and 1 rank x micro 4 x accum 8: the same 32 samples, same masks.
    two_ranks = _plan(tmp_path)
    one_rank = _plan(tmp_path, "launch.nproc_per_node=1", "train.micro_batch_size=4")
    assert (two_ranks.batch.world_size, one_rank.batch.grad_accum) == (2, 8)
    for step in (0, 7, 300):  # 300 is in a later epoch
        assert _as_set(_global_batch(two_ranks, step)) == _as_set(_global_batch(one_rank, step))


def test_steps_and_epochs_give_different_batches_and_a_resume_needs_only_the_step(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    b = _batches(plan, 0)
    first, second = b.for_step(0), b.for_step(1)
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])
    again = _batches(plan, 0).for_step(1)  # a fresh object, as after a restart
    assert all(torch.equal(x[k], y[k]) for x, y in zip(second, again, strict=True) for k in x)
    epoch, in_epoch = b.position(b.steps_per_epoch + 3)
    assert (epoch, in_epoch) == (1, 3)


def test_masking_follows_berts_recipe(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "data.mask_prob=0.15")
    b = _batches(plan, 0)
    rows = b.rows[:256]
    batch = b.collate(rows, epoch=0)
    original = b.tokens.ids.take(rows)[0]
    chosen = batch["labels"] != -100
    assert torch.equal(batch["labels"][chosen], original[chosen])  # the loss is on the true tokens
    assert 0.12 < chosen.float().mean().item() < 0.18
    masked = batch["input_ids"][chosen] == b.tokens.mask_id
    assert 0.75 < masked.float().mean().item() < 0.85  # 80 % [MASK], the rest random or kept
    assert not chosen[original == b.tokens.special_ids[2]].any()  # [CLS] is never a target


def test_jsonl_data_reads_the_text_field(tmp_path: Path) -> None:
    lines = (ROOT / "recipes" / "data" / "corpus.txt").read_text().splitlines()[:300]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(lines)))
    plan = _plan(tmp_path, "data.kind=jsonl", f"data.paths=[{json.dumps(str(path))}]", "data.text_field=body")
    tokens = data.load_tokens(plan, 0, lambda: None)
    assert tokens.ids.shape[1] == plan.recipe.data.seq_len
    assert len(tokens.ids) > 50
    assert tokens.vocab_size > len(data.SPECIALS)


def test_a_jsonl_record_without_the_field_names_file_and_line(tmp_path: Path) -> None:
    # `check` reads the first 1000 records (launcher.plan.data_check); the workers read every one.
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine record of a few words"}\n' * 1001 + '{"other": "no text here"}\n')
    where = r"bad.jsonl:1002: record has no field 'text' \(data.text_field\)"
    # The launcher reads every record to train the tokenizer, before any worker starts.
    with pytest.raises(UserError, match=rf"^data.paths: .*{where}"):
        _plan(tmp_path, "data.kind=jsonl", f"data.paths=[{json.dumps(str(path))}]")
    # With a tokenizer given, the workers read every record as they tokenize.
    tok = vocab.prepare(load(ROOT / "recipes" / "bert_tiny.yaml"), (str(CORPUS),))
    plan = _plan(
        tmp_path,
        "data.kind=jsonl",
        f"data.paths=[{json.dumps(str(path))}]",
        f"data.tokenizer={json.dumps(str(tok))}",
    )
    with pytest.raises(ValueError, match=where):
        data.load_tokens(plan, 0, lambda: None)


def test_a_trained_tokenizer_is_the_same_for_every_run_on_the_same_files(tmp_path: Path) -> None:
    a = data.load_tokens(_plan(tmp_path / "a"), 0, lambda: None)
    b = data.load_tokens(_plan(tmp_path / "b"), 0, lambda: None)
    assert torch.equal(_every_row(a), _every_row(b))
    saved = tmp_path / "a" / "bert-tiny-mlm" / "tokenizer" / "tokenizer.json"
    assert saved.is_file()  # the run keeps its own copy


def test_a_local_tokenizer_directory_is_used_as_given(tmp_path: Path) -> None:
    trained = tmp_path / "tok"
    texts = (ROOT / "recipes" / "data" / "corpus.txt").read_text().splitlines()[:200]
    vocab._train_wordpiece(texts, trained)
    plan = _plan(tmp_path, f"data.tokenizer={json.dumps(str(trained))}")
    tokens = data.load_tokens(plan, 0, lambda: None)
    ids = json.loads((trained / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens.vocab_size == len(ids) == plan.vocab_size
    assert tokens.mask_id == ids["[MASK]"]


def test_synthetic_data_is_seeded_and_avoids_special_ids(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "data.kind=synthetic", "data.paths=[]", "data.num_samples=64")
    a, b = data.load_tokens(plan, 0, lambda: None), data.load_tokens(plan, 1, lambda: None)
    ids = _every_row(a)
    assert torch.equal(ids, _every_row(b))  # every rank holds the same samples
    assert a.ids.shape == ids.shape == (64, plan.recipe.data.seq_len)
    assert int(ids.min()) >= len(data.SPECIALS)
    assert np.unique(ids.numpy()).size > 100


def test_too_little_data_for_one_global_batch_is_a_clear_error(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "data.kind=synthetic", "data.paths=[]", "data.num_samples=20")
    tokens = data.load_tokens(plan, 0, lambda: None)
    with pytest.raises(ValueError, match="cannot fill one global batch of 32"):
        data.Batches(tokens, np.arange(len(tokens.ids)), plan, 0)


def test_the_shipped_bert_recipe_has_training_and_evaluation_batches(tmp_path: Path) -> None:
    # Its held-out 5 % is smaller than one global batch of 256: evaluation reads it micro-batch
    # by micro-batch and must not demand a full global batch (it once stopped the main job at start).
    plan = resolve(load(ROOT / "recipes" / "bert.yaml", [f"logging.dir={tmp_path}"]), CPU)
    token_cache.place_tokenizer(plan)
    tokens = data.load_tokens(plan, 0, lambda: None)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    assert 0 < len(rows.eval) < plan.batch.global_batch_size
    train = data.Batches(tokens, rows.train, plan, 0)
    evals = data.Batches(tokens, rows.eval, plan, 0, evaluation=True)
    assert train.steps_per_epoch >= 1
    batch = evals.collate(evals.rows[: evals.micro], epoch=0)
    assert batch["input_ids"].shape == (min(evals.micro, len(rows.eval)), plan.recipe.data.seq_len)
