"""A user's own model and dataset modules, and recipes that name them (`model.target`, `data.target`).

Shared by the unit, worker and e2e tests of those doors: the module's source is written beside
the recipe in a tmp folder, as a user keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.runs import FAST_USER_MODEL, write_recipe

MODEL_FILE = """
import json, os
from torch import nn


class Tiny(nn.Module):
    def __init__(self, vocab_size, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, labels):
        logits = self.head(self.embed(input_ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def build(vocab_size, hidden=8, record=None):
    if record:
        with open(record, "w") as f:
            json.dump({"vocab_size": vocab_size, "cwd": os.getcwd()}, f)
    return Tiny(vocab_size, hidden)


def fixed(hidden=8):
    return Tiny(50, hidden)  # takes no vocab_size: 50 rows whatever the data


def anything(**kwargs):
    return kwargs


class WithPositions(Tiny):
    def __init__(self, vocab_size, hidden):
        super().__init__(vocab_size, hidden)
        self.positions = nn.Embedding(8, hidden)  # fewer rows than the vocabulary: fine

    def forward(self, input_ids, labels):
        import torch

        h = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def positions(vocab_size):
    return WithPositions(vocab_size, 8)
"""


def model_recipe(folder: Path, name: str, model: dict, *layers: dict) -> Path:
    """A recipe naming `my_models:build` (MODEL_FILE, written beside it) with `model` keys on top."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_models.py").write_text(MODEL_FILE)
    base = {"model": {"name": None, "target": "my_models:build", **model}}
    return write_recipe(folder, name, FAST_USER_MODEL, base, *layers)


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


def data_recipe(folder: Path, name: str, *layers: dict[str, Any], model: dict[str, Any] = USER_MODEL) -> Path:
    """A recipe extending the shipped tiny BERT (whose base names text files) with data.target,
    its module beside it, and `model` (default: the module's causal model)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(DATA_FILE)
    return write_recipe(folder, name, FAST_USER_MODEL, {"model": model, "data": CAUSAL}, *layers)
