"""Per-record batches: sequence-classification and sft (worker side; launcher.recipe.tasks says what each holds).

Each record becomes one row of data.seq_len tokens: truncated when longer, padded
with the tokenizer's pad token when shorter, with `attention_mask` marking the real
tokens. The rows are tokenized once, on load, in record order; launcher.worker.data.Batches
draws them in the same seeded order as the LM rows, so resume stays exact.

- sequence-classification: the record's data.text_field with the tokenizer's own
  special tokens ([CLS] … [SEP] for BERT); `labels` (batch,) from data.label_field, a
  whole number below the model's number of labels.
- sft: the prompt (with the tokenizer's special tokens, such as Llama's <s>) then the
  response and the end-of-sequence token; `labels` are the ids on the response and
  -100 on the prompt and padding. A prompt that fills the row leaves no response: such
  records are counted and refused when every record is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.plan.resolve import Plan
from launcher.recipe import tasks

PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>", "</s>", "<eos>")
END_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


@dataclass(frozen=True)
class Examples:
    """Every record as a padded row: ids, attention mask and labels."""

    ids: torch.Tensor  # (num_records, seq_len) int64
    attention_mask: torch.Tensor  # (num_records, seq_len) int64
    labels: torch.Tensor  # (num_records,) for classification, (num_records, seq_len) for sft

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(rows)
        return {
            "input_ids": self.ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def load(plan: Plan, tokenizer: Any) -> Examples:
    """The run's records as rows (synthetic ones for data.kind synthetic).

    A classifier's labels must be below its classes (`Plan.model.num_labels`).

    Args:
        tokenizer: a `tokenizers.Tokenizer` (launcher.worker.data loads the run's).

    Raises:
        ValueError: a record's label is no whole number in range, or no record keeps a response.
    """
    from launcher.plan import records

    d, task, num_labels = plan.recipe.data, plan.model.task, plan.model.num_labels
    if d.kind == "synthetic":
        return _synthetic(plan, num_labels)
    classify = task == tasks.SEQUENCE_CLASSIFICATION
    fields = (d.text_field, d.label_field) if classify else (d.prompt_field, d.response_field)
    found = records.read_records(plan.recipe, plan.data_paths, fields)
    pad = _first_id(tokenizer, PAD_TOKENS, default=0)
    if classify:
        assert num_labels is not None, "the model decides the classes"
        rows = [enc.ids for enc in tokenizer.encode_batch([str(r[d.text_field]) for r in found])]
        labels = torch.tensor(
            [_label(r[d.label_field], i, num_labels, d.label_field) for i, r in enumerate(found)]
        )
        ids, mask = _pad(rows, d.seq_len, pad)
        return Examples(ids, mask, labels)
    return _sft(found, tokenizer, d.seq_len, pad, d.prompt_field, d.response_field)


def _sft(
    found: list[dict[str, Any]], tokenizer: Any, seq_len: int, pad: int, prompt: str, response: str
) -> Examples:
    end = _first_id(tokenizer, END_TOKENS, default=None)
    prompts = tokenizer.encode_batch([str(r[prompt]) for r in found])
    responses = tokenizer.encode_batch([str(r[response]) for r in found], add_special_tokens=False)
    rows, targets = [], []
    for p, r in zip(prompts, responses, strict=True):
        tail = r.ids + ([end] if end is not None else [])
        rows.append((p.ids + tail)[:seq_len])
        targets.append(([-100] * len(p.ids) + tail)[:seq_len])
    ids, mask = _pad(rows, seq_len, pad)
    labels, _ = _pad(targets, seq_len, -100)
    kept = int((labels != -100).any(dim=1).sum())
    if kept == 0:
        raise ValueError(
            f"every prompt fills data.seq_len {seq_len}: no response token is left to learn; raise data.seq_len"
        )
    return Examples(ids, mask, labels)


def _pad(rows: list[list[int]], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[:seq_len]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _label(value: Any, index: int, num_labels: int, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < num_labels:
        raise ValueError(
            f"record {index}: {key} {value!r} is not a class number 0..{num_labels - 1} (data.label_field; "
            "model.num_labels sets the number of classes, and string labels need mapping to numbers first)"
        )
    return int(value)


def _first_id(tokenizer: Any, names: tuple[str, ...], default: int | None) -> Any:
    return next((i for i in map(tokenizer.token_to_id, names) if i is not None), default)


def _synthetic(plan: Plan, num_labels: int | None) -> Examples:
    """Random rows for throughput work: random classes, or the first half of each row as its prompt."""
    d = plan.recipe.data
    gen = torch.Generator().manual_seed(plan.recipe.train.seed)
    ids = torch.randint(5, plan.vocab_size, (d.num_samples, d.seq_len), generator=gen)
    mask = torch.ones_like(ids)
    if num_labels is not None:
        return Examples(ids, mask, torch.randint(0, num_labels, (d.num_samples,), generator=gen))
    labels = ids.clone()
    labels[:, : d.seq_len // 2] = -100
    return Examples(ids, mask, labels)
