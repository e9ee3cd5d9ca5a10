"""A user's dataset (`data.target`, "module:factory"): imported, called, and read by row (worker side).

The module is imported as model.target's is (launcher.worker.models): the recipe's folder first
(`Plan.import_dir`), then the working directory and PYTHONPATH. The factory is called on every
rank as `factory(seq_len=data.seq_len, vocab_size=Plan.vocab_size, seed=train.seed, **data.kwargs)`,
given only the first three its signature takes, and returns a map-style dataset: `len(ds)`, and
`ds[i]` a dict with `input_ids` (data.seq_len whole numbers below the vocabulary), optionally
`attention_mask` (0 or 1 each) and `labels`. Every item gives the same keys.

launcher.worker.data.Batches reads the rows a step names (a seeded order of row numbers), so a dataset
whose item i depends only on i (and the seed it is given) resumes bitwise exactly. What the task
(launcher.recipe.tasks) needs and the items lack is filled as for the other sources:

- causal-lm and sft without labels: the rows go to Batches as token rows (`DatasetRows`), which
  sets `labels` to `input_ids`, -100 where attention_mask is 0;
- masked-lm without labels: the same, with the project's seeded masking. The [MASK] id and the
  special ids come from data.tokenizer (else model.hf's tokenizer.json); without either, the
  synthetic data's convention: ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK];
- items with labels (required for sequence-classification: one class number each; for the LM
  tasks data.seq_len ids, -100 for no loss) are collated as records (`DatasetExamples`).

Each item is checked when a batch first reads it: a wrong length, a missing input_ids, an id
past the vocabulary or a wrong-typed label is a ValueError naming the item, which the worker
reports as one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.plan import targets, vocab
from launcher.plan.resolve import Plan
from launcher.recipe import tasks
from launcher.worker.examples import Examples

OPTIONAL = ("attention_mask", "labels")


def load(plan: Plan) -> Any:
    """The run's samples from data.target: `DatasetRows` (launcher.worker.data wraps them as its Tokens)
    for LM rows without labels, else `DatasetExamples`.

    Raises:
        ValueError: the factory cannot be imported or called, returns no map-style dataset, or its
            first item is unusable.
    """
    d, task = plan.recipe.data, plan.model.task
    assert d.target is not None, "launcher.worker.data dispatches only a data.target here"
    dataset = _call(targets.load(d.target, plan.import_dir, "data.target"), d.target, plan)
    rows = DatasetRows(dataset, d.target, d.seq_len, plan.vocab_size, plan.model.num_labels)
    if "labels" in rows.keys or task == tasks.SEQUENCE_CLASSIFICATION:
        if "labels" not in rows.keys:
            raise ValueError(
                f"data.target: {d.target}'s item 0 has no 'labels'; data.task sequence-classification "
                "needs a class number in every item"
            )
        return DatasetExamples(rows)
    if task == tasks.MASKED_LM:
        rows.mask_id, rows.special_ids = _masking(plan)
    return rows


def _call(factory: Callable[..., Any], target: str, plan: Plan) -> Any:
    d = plan.recipe.data
    given = {"seq_len": d.seq_len, "vocab_size": plan.vocab_size, "seed": plan.recipe.train.seed}
    kwargs = {k: v for k, v in given.items() if targets.takes(factory, k)}
    kwargs.update(d.kwargs)
    try:
        dataset = factory(**kwargs)
    except TypeError as exc:
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k in given)
        raise ValueError(f"data.target: {target}({shown}, **data.kwargs) failed: {exc}") from None
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"data.target: {target} returned {type(dataset).__name__}, not a map-style dataset "
            "(it needs __len__ and __getitem__; an iterable dataset cannot be read by row)"
        )
    return dataset


def _masking(plan: Plan) -> tuple[int, tuple[int, ...]]:
    """The [MASK] id and the special ids (never masked) for masked-lm rows without labels."""
    from launcher.run import token_cache

    hf = Path(plan.hf_dir) if plan.hf_dir and Path(plan.hf_dir).is_dir() else None
    tok_dir = Path(plan.tokenizer_dir) if plan.tokenizer_dir else hf
    if tok_dir is None or not (tok_dir / vocab.TOKENIZER_FILE).is_file():
        return vocab.SPECIALS.index("[MASK]"), tuple(range(len(vocab.SPECIALS)))
    tokenizer = token_cache.load_tokenizer(tok_dir)
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        raise ValueError(
            f"the tokenizer in {tok_dir} has no [MASK] token; data.task masked-lm needs one, or give "
            "data.target's items their own labels"
        )
    return mask_id, tuple(i for i in map(tokenizer.token_to_id, vocab.SPECIALS) if i is not None)


class DatasetRows:
    """The user's dataset read by row, each item checked as a batch reads it (launcher.worker.data.Rows).

    `keys` are the optional keys item 0 gives; every item must give the same.
    """

    def __init__(
        self, dataset: Any, target: str, seq_len: int, vocab_size: int, num_labels: int | None
    ) -> None:
        self.dataset, self.target, self.seq_len, self.vocab_size = dataset, target, seq_len, vocab_size
        self.num_labels = num_labels  # sequence-classification: labels are one class number each
        self.mask_id: int = -1  # masked-lm: set by `load`
        self.special_ids: tuple[int, ...] = ()
        try:
            num_rows = len(dataset)
        except TypeError as exc:
            raise ValueError(f"data.target: len() of {target}'s dataset failed: {exc}") from None
        if num_rows == 0:
            raise ValueError(f"data.target: {target} returned an empty dataset")
        self.shape = (num_rows, seq_len)
        first = self._item(0)
        self.keys = tuple(k for k in OPTIONAL if k in first)
        self.check(first, 0)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input ids, attention mask or None when the items give none), each (len(rows), seq_len)."""
        batch = self.collate(rows)
        return batch["input_ids"], batch.get("attention_mask")

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The items of these rows, checked and stacked; LM labels filled when the items give none."""
        items = [self.check(self._item(int(i)), int(i)) for i in rows]
        batch = {key: torch.stack([item[key] for item in items]) for key in ("input_ids", *self.keys)}
        if "labels" not in batch:  # sft without labels: as causal-lm (launcher.worker.data.Batches)
            mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            batch["labels"] = ids.clone() if mask is None else ids.masked_fill(mask == 0, -100)
        return batch

    def _item(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except Exception as exc:
            raise ValueError(f"{self._where(i)}: reading it failed: {type(exc).__name__}: {exc}") from exc

    def _where(self, i: int) -> str:
        return f"data.target: {self.target}'s item {i}"

    def check(self, item: Any, i: int) -> dict[str, torch.Tensor]:
        """The item as int64 tensors; a ValueError naming what is wrong with it."""
        if not isinstance(item, Mapping) or "input_ids" not in item:
            what = f"a dict of {sorted(map(str, item))}" if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(
                f"{self._where(i)} is {what}; expected a dict with input_ids (attention_mask, labels optional)"
            )
        keys = tuple(k for k in OPTIONAL if k in item)
        if keys != self.keys:
            raise ValueError(
                f"{self._where(i)} gives {list(keys)} of the optional {list(OPTIONAL)} but item 0 gives "
                f"{list(self.keys)}; every item must give the same keys"
            )
        out = {"input_ids": self._ids(item["input_ids"], i, "input_ids", low=0)}
        if "attention_mask" in item:
            mask = self._ids(item["attention_mask"], i, "attention_mask", low=0)
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{self._where(i)}: attention_mask holds values other than 0 and 1")
            out["attention_mask"] = mask
        if "labels" in item:
            labels = item["labels"]
            classes = self.num_labels is not None
            out["labels"] = self._label(labels, i) if classes else self._ids(labels, i, "labels", low=-100)
        return out

    def _ints(self, value: Any, i: int, key: str) -> torch.Tensor:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{self._where(i)}: {key} {_short(value)} is not a sequence of whole numbers"
            ) from None
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{self._where(i)}: {key} holds {t.dtype} values; expected whole numbers")
        return t.to(torch.int64)

    def _ids(self, value: Any, i: int, key: str, low: int) -> torch.Tensor:
        t = self._ints(value, i, key)
        if t.ndim != 1 or len(t) != self.seq_len:
            got = f"{len(t)} values" if t.ndim == 1 else f"shape {tuple(t.shape)}"
            raise ValueError(f"{self._where(i)}: {key} has {got}, expected data.seq_len {self.seq_len}")
        if key == "attention_mask":
            return t
        bad = t[((t < 0) & (t != low)) | (t >= self.vocab_size)]
        if len(bad):
            allowed = "-100 or " if low == -100 else ""
            raise ValueError(
                f"{self._where(i)}: {key} holds id {int(bad[0])}; expected {allowed}0..{self.vocab_size - 1}, "
                "the run's vocabulary (model.vocab_size, model.kwargs.vocab_size, model.hf's config or "
                "data.tokenizer)"
            )
        return t

    def _label(self, value: Any, i: int) -> torch.Tensor:
        assert self.num_labels is not None
        t = torch.as_tensor(value) if isinstance(value, int | np.integer | torch.Tensor) else None
        integral = t is not None and t.ndim == 0 and not (t.dtype == torch.bool or t.dtype.is_floating_point)
        if isinstance(value, bool) or t is None or not integral or not 0 <= int(t) < self.num_labels:
            raise ValueError(
                f"{self._where(i)}: labels {_short(value)} is not a class number 0..{self.num_labels - 1} "
                "(sequence-classification takes one whole number per item; model.num_labels sets the number "
                "of classes)"
            )
        return t.to(torch.int64)


class DatasetExamples(Examples):
    """Items with labels, collated as records by launcher.worker.data.Batches (not held tokenized in memory).

    Examples' tensors are (num_rows, 0) placeholders: outside `collate` only their length is read
    (the training/evaluation split).
    """

    rows: DatasetRows

    def __init__(self, rows: DatasetRows) -> None:
        empty = torch.empty((len(rows), 0), dtype=torch.int64)
        super().__init__(empty, empty, empty)
        object.__setattr__(self, "rows", rows)  # Examples is frozen

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self.rows.collate(rows)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
