"""A user's data.target read by the worker's loader: causal and masked batches, labelled records, bad items."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from launcher.run import token_cache
from tests.user_code import MODULE, VOCAB, data_recipe


@pytest.fixture
def import_hygiene(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker puts the import folder on sys.path and the module in sys.modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop(MODULE, None)


CPU = Hardware(cpu_count=2)


def _plan(tmp_path: Path, *overrides: str) -> Plan:
    """The plan as the launcher leaves it for the workers: RUN_DIR/tokenizer in place."""
    plan = resolve(load(data_recipe(tmp_path, "batches"), list(overrides)), CPU)
    token_cache.place_tokenizer(plan)
    return plan


def _first_batch(plan: Plan, step: int = 0) -> list[dict[str, Any]]:
    from launcher.worker import data

    tokens = data.load_tokens(plan, 0, lambda: None)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    return data.Batches(tokens, rows.train, plan, 0).for_step(step)


@pytest.mark.usefixtures("import_hygiene")
def test_causal_batches_are_read_by_row_and_labelled_from_the_inputs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    batch = _first_batch(_plan(tmp_path))[0]
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 32)
    assert torch.equal(batch["labels"], batch["input_ids"])
    steps = batch["input_ids"][:, 1:] - batch["input_ids"][:, :-1]
    assert bool(((steps % VOCAB) == (steps[:, :1] % VOCAB)).all())  # arithmetic rows, read whole
    padded = _first_batch(_plan(tmp_path, "data.kwargs.padded=true"))[0]
    mask = padded["attention_mask"]
    assert bool((mask == 0).any())
    assert torch.equal(padded["labels"], padded["input_ids"].masked_fill(mask == 0, -100))


@pytest.mark.usefixtures("import_hygiene")
def test_masked_lm_batches_are_masked_by_seed_and_step_as_other_sources(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    plan = _plan(tmp_path, "data.task=masked-lm")
    first, again = _first_batch(plan, 3)[1], _first_batch(plan, 3)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    chosen = first["labels"] != -100
    assert bool(chosen.any())
    assert bool((first["input_ids"][chosen] == 4).any())  # [MASK] is id 4 without a tokenizer


@pytest.mark.usefixtures("import_hygiene")
def test_items_with_labels_are_collated_as_records(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    plan = _plan(tmp_path, f"data.target={MODULE}:labelled", "data.task=sequence-classification")
    batch = _first_batch(plan)[0]
    assert batch["labels"].shape == (4,)
    assert batch["labels"].dtype == torch.int64
    assert set(batch["labels"].tolist()) <= {0, 1}


@pytest.mark.usefixtures("import_hygiene")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.kwargs.flaw=length"], r"item \d+: input_ids has 31 values, expected data.seq_len 32"),
        (["data.kwargs.flaw=id"], r"item \d+: input_ids holds id 64; expected 0..63, the run's vocabulary"),
        (["data.kwargs.flaw=no_ids"], r"item \d+ is a dict of \['tokens'\]; expected a dict with input_ids"),
        (["data.kwargs.flaw=float"], r"item \d+: input_ids holds torch.float32 values"),
        (
            [f"data.target={MODULE}:labelled", "data.task=sequence-classification", "data.kwargs.label=x"],
            r"item \d+: labels 'x' is not a class number 0..1",
        ),
        (
            [f"data.target={MODULE}:labelled", "data.task=sequence-classification", "data.kwargs.label=7"],
            r"item \d+: labels 7 is not a class number 0..1",
        ),
    ],
)
def test_a_bad_item_is_one_clear_error_at_the_first_batch(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    plan = _plan(tmp_path, *overrides)
    assert _first_batch_error(plan, message).startswith(f"data.target: {plan.recipe.data.target}'s item")


@pytest.mark.usefixtures("import_hygiene")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([f"data.target={MODULE}:not_a_dataset"], r"returned range_iterator, not a map-style dataset"),
        # A class number where causal-lm takes a row of labels.
        ([f"data.target={MODULE}:labelled"], r"item 0: labels has shape \(\), expected data.seq_len 32"),
        (
            [f"data.target={MODULE}:arithmetic", "data.task=sequence-classification"],
            r"item 0 has no 'labels'",
        ),
        (["data.kwargs.unknown=1"], r"arith_data:arithmetic\(seq_len=32, vocab_size=64, seed=1234, \*\*data"),
    ],
)
def test_a_factory_that_gives_no_usable_dataset_is_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    _first_batch_error(_plan(tmp_path, *overrides), message)


def _first_batch_error(plan: Plan, message: str) -> str:
    """The one-line ValueError the first batch of `plan` raises, matching `message`."""
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=message) as caught:
        _first_batch(plan)
    assert "\n" not in str(caught.value)
    return str(caught.value)
