"""The `data.target` contract: a user's dataset factory next to the recipe, what it is given, which
keys beside it are refused at check, what the task fills in, and how a bad item is reported.

The recipe and its module live in a tmp folder; the unit tests check and read them in-process,
and three short runs go through the CLI from the project root, as a user's would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import load
from tests.runs import FAST_USER_MODEL, explain, mplaunch, records, write_recipe

CPU = Hardware(cpu_count=2)
MODULE = "arith_data"
VOCAB = 64

DATA_FILE = '''
import json, os

import torch
from torch import nn


class Arithmetic:
    """Item i: an arithmetic sequence modulo the vocabulary, a pure function of (seed, i)."""

    def __init__(self, seq_len, vocab_size, seed, num_rows=96, flaw=None, padded=False):
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
        self.num_rows, self.flaw, self.padded = num_rows, flaw, padded

    def __len__(self):
        return self.num_rows

    def __getitem__(self, i):
        start, step = (self.seed + 7 * i) % self.vocab_size, 1 + i % 5
        ids = [(start + k * step) % self.vocab_size for k in range(self.seq_len)]
        item = {"input_ids": ids}
        if self.padded:  # the last i % 4 positions are padding
            item["attention_mask"] = [1] * (self.seq_len - i % 4) + [0] * (i % 4)
        if self.flaw and i > 0:  # item 0 is fine: the first batch finds the flaw
            if self.flaw == "length":
                item["input_ids"] = ids[:-1]
            elif self.flaw == "id":
                item["input_ids"] = [self.vocab_size] + ids[1:]
            elif self.flaw == "no_ids":
                item = {"tokens": ids}
            elif self.flaw == "float":
                item["input_ids"] = [float(x) for x in ids]
        return item


def arithmetic(seq_len, vocab_size, seed, num_rows=96, flaw=None, padded=False):
    return Arithmetic(seq_len, vocab_size, seed, num_rows, flaw, padded)


def labelled(seq_len, vocab_size, num_rows=96, label=None):
    """A list is a map-style dataset too: each item has its class."""
    ids = [[(i + k) % vocab_size for k in range(seq_len)] for i in range(num_rows)]
    rows = [{"input_ids": row, "labels": i % 2} for i, row in enumerate(ids)]
    for row in rows[1:] if label is not None else []:  # item 0 is fine: the first batch finds the flaw
        row["labels"] = label
    return rows


def not_a_dataset(seq_len):
    return iter(range(3))


class Causal(nn.Module):
    def __init__(self, vocab_size, record=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, vocab_size)
        self.drop = nn.Dropout(0.1)
        self.record = record

    def forward(self, input_ids, labels, attention_mask=None):
        if self.record:  # the first batch this rank's model receives
            with open(f"{self.record}.{os.environ.get('RANK', '0')}.json", "w") as f:
                json.dump({"input_ids": input_ids.tolist(), "labels": labels.tolist()}, f)
            self.record = None
        logits = self.head(self.drop(torch.relu(self.embed(input_ids))))[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def model(vocab_size, record=None):
    return Causal(vocab_size, record)
'''

USER_MODEL = {"name": None, "target": f"{MODULE}:model", "kwargs": {"vocab_size": VOCAB}}
CAUSAL = {"task": "causal-lm", "target": f"{MODULE}:arithmetic"}


def user_recipe(folder: Path, name: str, *layers: dict[str, Any], model: dict[str, Any] = USER_MODEL) -> Path:
    """A recipe extending the shipped tiny BERT (whose base names text files) with data.target,
    its module beside it, and `model` (default: the module's causal model)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(DATA_FILE)
    return write_recipe(folder, name, FAST_USER_MODEL, {"model": model, "data": CAUSAL}, *layers)


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", *args])
    return code, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------- check


def test_a_dataset_beside_its_recipe_passes_check_without_being_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The base (bert_tiny.yaml, from bert.yaml) names data.kind text and data.paths: inherited, not refused.
    recipe = user_recipe(tmp_path, "ok")
    assert _check(capsys, str(recipe)) == (0, [])
    assert MODULE not in sys.modules
    plan = resolve(load(recipe), CPU)
    assert (plan.recipe.data.kind, plan.data_paths, plan.vocab_size) == ("synthetic", (), VOCAB)
    assert plan.import_dir == str(tmp_path.resolve())
    assert f"data       {MODULE}:arithmetic(seq_len=32, vocab_size=64" in plan.describe()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.paths=[corpus.txt]"], "data.paths"),
        (["data.kind=jsonl"], "data.kind"),
        (["data.text_field=body"], "data.text_field"),
        (["data.label_field=y"], "data.label_field"),
        (["data.prompt_field=q"], "data.prompt_field"),
        (["data.response_field=a"], "data.response_field"),
        (["data.pack=false"], "data.pack"),
        (["data.num_samples=64"], "data.num_samples"),
        (["data.kwargs.seq_len=8"], "data.kwargs.seq_len"),
        (["data.kwargs.seed=3"], "data.kwargs.seed"),
        (["data.target=no_such_module:build"], "data.target: cannot import 'no_such_module'"),
        # The vocabulary must be known without training a tokenizer on files.
        (["model.kwargs={}"], "data.target: the vocabulary must be known"),
        (["model.name=gpt2-lm", "model.target=null", "model.kwargs={}"], "model.vocab_size"),
    ],
)
def test_a_key_that_does_nothing_beside_data_target_is_one_line_at_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], key: str
) -> None:
    recipe = user_recipe(tmp_path, "refused")
    code, lines = _check(capsys, str(recipe), *overrides)
    assert code == 2
    assert len(lines) == 1, lines
    assert key in lines[0]


def test_the_vocabulary_of_a_dataset_comes_from_the_model_or_a_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = user_recipe(tmp_path, "vocab")
    built_in = ["model.name=gpt2-lm", "model.target=null", "model.kwargs={}", "model.vocab_size=100"]
    assert resolve(load(recipe, built_in), CPU).vocab_size == 100
    (tmp_path / "tok").mkdir()
    tokenizer = {"model": {"vocab": {f"t{i}": i for i in range(40)}}, "added_tokens": []}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert resolve(load(recipe, ["model.kwargs={}", "data.tokenizer=tok"]), CPU).vocab_size == 40
    code, lines = _check(capsys, str(recipe), "data.kwargs.vocab_size=9")
    assert code == 2
    assert len(lines) == 1
    assert "data.kwargs.vocab_size" in lines[0]


def test_data_kwargs_without_a_target_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = user_recipe(tmp_path, "stray", {"data": {"target": None, "task": "auto"}})
    code, lines = _check(capsys, str(recipe), "data.kwargs.n=1")
    assert (code, len(lines)) == (2, 1), lines
    assert "data.kwargs: only used with data.target" in lines[0]


# --------------------------------------------------------------------------- the batches


@pytest.fixture
def import_hygiene(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker puts the import folder on sys.path and the module in sys.modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop(MODULE, None)


def _plan(tmp_path: Path, *overrides: str) -> Plan:
    return resolve(load(user_recipe(tmp_path, "batches"), list(overrides)), CPU)


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


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_a_user_model_receives_causal_batches_of_the_dataset_on_two_ranks(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    recipe = user_recipe(
        tmp_path / "project",
        "mine",
        {"model": {"kwargs": {"record": str(seen)}}, "backend": "deepspeed", "train": {"max_steps": 2}},
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 0, explain(result)
    batches = [json.loads(Path(f"{seen}.{rank}.json").read_text()) for rank in (0, 1)]
    for batch in batches:
        assert batch["labels"] == batch["input_ids"]
        assert all(len(row) == 32 and max(row) < VOCAB for row in batch["input_ids"])
    assert batches[0]["input_ids"] != batches[1]["input_ids"]  # each rank its slice of the global batch
    assert any(r["step"] == 2 for r in records(tmp_path / "project" / "runs" / "mine", "train"))


@pytest.mark.slow
def test_a_built_in_model_trains_on_a_user_dataset_under_accelerate(tmp_path: Path) -> None:
    recipe = user_recipe(
        tmp_path,
        "gpt2",
        {"backend": "accelerate", "zero": {"stage": 0}, "train": {"max_steps": 2}},
        model={"name": "gpt2-lm", "vocab_size": VOCAB, "dropout": 0.0},
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 0, explain(result)
    assert sorted(r["step"] for r in records(tmp_path / "runs" / "gpt2", "train")) == [1, 2]


@pytest.mark.slow
def test_a_bad_item_stops_the_run_with_one_line_naming_it(tmp_path: Path) -> None:
    recipe = user_recipe(
        tmp_path,
        "flawed",
        {
            "data": {"kwargs": {"flaw": "length"}},
            "backend": "accelerate",
            "zero": {"stage": 0},
            "launch": {"nproc_per_node": 1},
            "train": {"global_batch_size": 8, "max_steps": 2},
        },
    )
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode != 0, explain(result)
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if "the run failed on rank-0" in line]
    assert len(failed) == 1, explain(result)
    assert "data.target: arith_data:arithmetic's item" in failed[0]
    assert "input_ids has 31 values, expected data.seq_len 32" in failed[0]
