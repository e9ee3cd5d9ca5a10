"""data.task decides the batches: masked-LM masking or causal-LM labels, for built-in models and targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runs import FAST, FAST_USER_MODEL, ROOT, explain, losses, mplaunch, write_recipe

CORPUS = ROOT / "recipes" / "data" / "corpus.txt"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer (no [MASK], <|endoftext|> between documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(CORPUS)], trainer)
    tok.save(str(out / "tokenizer.json"))
    return out


ONE_RANK = {"launch": {"nproc_per_node": 1}, "train": {"global_batch_size": 8, "max_steps": 4}}


@pytest.mark.slow
def test_gpt2_trains_with_a_bpe_tokenizer(tmp_path: Path, bpe: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "gpt2_bpe",
        FAST,
        ONE_RANK,
        {"model": {"name": "gpt2-lm", "size": "tiny"}, "data": {"tokenizer": str(bpe)}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    assert sorted(losses(tmp_path / "runs" / "gpt2_bpe")) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "ok"), [("causal-lm", True), ("masked-lm", False)])
def test_a_user_causal_lm_gets_causal_batches_when_the_recipe_says_so(
    tmp_path: Path, bpe: Path, task: str, ok: bool
) -> None:
    recipe = write_recipe(
        tmp_path,
        "causal_target",
        FAST_USER_MODEL,
        ONE_RANK,
        {
            "model": {"name": None, "target": "causal_model:build", "kwargs": {"vocab_size": 400}},
            "data": {"tokenizer": str(bpe), "task": task},
        },
    )
    result = mplaunch(str(recipe))
    if ok:
        assert result.returncode == 0, explain(result)
        assert sorted(losses(tmp_path / "runs" / "causal_target")) == [1, 2, 3, 4]
    else:
        # A BPE tokenizer has no [MASK]: masked-LM batches cannot even be made; the plan says so, exit 2.
        assert result.returncode == 2, explain(result)
        assert "data.task masked-lm masks tokens with [MASK], and the tokenizer in" in result.stderr, explain(result)


def test_check_refuses_a_built_in_model_the_wrong_objective(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "wrong_task", FAST, {"data": {"task": "causal-lm"}})  # bert-mlm
    result = mplaunch("check", str(recipe))
    assert result.returncode == 2, explain(result)
    assert "data.task: bert-mlm is a masked-lm model, it cannot train causal-lm" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_dry_run_shows_the_task(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "shown", FAST, {"model": {"name": "gpt2-lm", "size": "tiny"}})
    result = mplaunch(str(recipe), "--dry-run")
    assert "causal-lm (data.task auto)" in result.stdout, explain(result)
