"""Datasets, tokenizers and the resumable batch order (worker side).

The sample order is a pure function of (seed, step): optimizer step k of
epoch e uses the samples perm_e[k*G:(k+1)*G] of a seeded permutation, and
micro-batch j of rank r takes its slice of that global batch. So a resumed
run needs only the step count to continue exactly where it stopped, and the
same global batch is seen whatever the split into ranks and accumulation.
Masked-LM masking is seeded per (seed, epoch, sample) for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from launcher.plan import data_check, digests, vocab
from launcher.plan.resolve import Plan
from launcher.recipe import tasks
from launcher.run import token_cache
from launcher.rundir.layout import RunDir
from launcher.worker.examples import Examples

SPECIALS = vocab.SPECIALS
# What pads a one-document row (data.pack false); id 0 when the tokenizer has none.
PAD_TOKENS = ("[PAD]", "<pad>")


class Rows(Protocol):
    """The samples, read row by row: only the rows a batch names are ever loaded."""

    @property
    def shape(self) -> tuple[int, int]: ...  # (num_rows, seq_len)

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input ids, attention mask or None when no row holds padding), each (len(rows), seq_len) int64."""
        ...


@dataclass(frozen=True)
class Tokens:
    """The samples, one row each, plus what masking needs."""

    ids: Rows
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]


class ArrayRows:
    """Rows held in memory (synthetic data)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.shape = (int(ids.shape[0]), int(ids.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return self.take(rows)[0]

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.from_numpy(self.ids[rows].astype(np.int64)), None


class StreamRows:
    """Rows cut from the memory-mapped token stream of a token_cache.TokenCache.

    Packed (data.pack true): row i is stream[i*body:(i+1)*body], the documents run
    on across rows; `positions` says where each one starts. Otherwise row i is document
    i, cut to body tokens and padded with `pad_id`; `take` then also gives the attention
    mask. `framing` (cls, sep), for masked-LM: each row reads [CLS] body [SEP] as BERT
    does, body = seq_len - 2.
    """

    def __init__(
        self,
        cache: token_cache.TokenCache,
        seq_len: int,
        framing: tuple[int, int] | None,
        pack: bool = True,
        pad_id: int = 0,
    ) -> None:
        self.cache, self.seq_len, self.framing, self.pack, self.pad_id = cache, seq_len, framing, pack, pad_id
        self.body = seq_len - 2 if framing else seq_len
        num_rows = cache.num_tokens // self.body if pack else cache.num_documents
        if num_rows == 0 or cache.num_tokens == 0:
            raise ValueError(
                f"the data holds {cache.num_tokens} tokens, fewer than one sample of data.seq_len {seq_len}"
            )
        self.shape = (num_rows, seq_len)
        self._open()

    def _open(self) -> None:
        self.stream = self.cache.tokens()
        self.offsets = self.cache.offsets()

    # A DataLoader worker started by spawn gets the file names, not a copy of the mapped pages.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("stream", "offsets")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return self.take(rows)[0]

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = np.asarray(rows, dtype=np.int64)
        span = np.arange(self.body, dtype=np.int64)
        if self.pack:
            body = self.stream[rows[:, None] * self.body + span].astype(np.int64)
            if self.framing is None:
                return torch.from_numpy(body), None
            cls, sep = (np.full((len(rows), 1), i, dtype=np.int64) for i in self.framing)
            return torch.from_numpy(np.concatenate([cls, body, sep], axis=1)), None
        return self._documents(rows, span)

    def positions(self, rows: np.ndarray) -> torch.Tensor:
        """Each token's position in its document, (len(rows), seq_len) int64, of packed unframed rows.

        0 at a document's first token (the token after the previous document's separator, which
        ends the document it follows) and at the row's first token: a document continued from
        the previous row counts from 0 again, so positions stay below seq_len (a learned position
        table such as GPT-2's has no more rows). Only the restarts mark boundaries for a model
        (transformers starts a new sequence wherever a position is not its predecessor's + 1).
        """
        assert self.pack and self.framing is None, "positions of packed causal-lm rows"
        rows = np.asarray(rows, dtype=np.int64)
        row_starts = rows[:, None] * self.body
        at = row_starts + np.arange(self.body, dtype=np.int64)
        # Same dtype as the mapped offsets, so searchsorted reads a few pages instead of copying them all.
        document = np.searchsorted(self.offsets, at.astype(np.uint64), side="right") - 1
        starts = np.maximum(self.offsets[document].astype(np.int64), row_starts)
        return torch.from_numpy(at - starts)

    def _documents(self, rows: np.ndarray, span: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.offsets[rows].astype(np.int64)
        ends = self.offsets[rows + 1].astype(np.int64)
        if self.framing is not None and self.cache.separator_id is not None:
            ends -= 1  # the document's own [SEP] is the frame's closing one
        lengths = np.minimum(ends - starts, self.body)
        inside = span < lengths[:, None]
        body = np.where(inside, self.stream[np.where(inside, starts[:, None] + span, 0)], self.pad_id)
        if self.framing is None:
            return torch.from_numpy(body.astype(np.int64)), torch.from_numpy(inside.astype(np.int64))
        cls, sep = self.framing
        ids = np.full((len(rows), self.seq_len), self.pad_id, dtype=np.int64)
        ids[:, 0] = cls
        ids[:, 1 : 1 + self.body] = body
        ids[np.arange(len(rows)), 1 + lengths] = sep
        mask = np.arange(self.seq_len) < (lengths + 2)[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def load_tokens(plan: Plan, rank: int, barrier: Callable[[], None]) -> Tokens:
    """The samples of the run: synthetic tokens, or rows of the recipe's files tokenized.

    A tokenizer trained on the files is written once, by rank 0, into RUN_DIR/tokenizer
    and loaded from there on resume, so every rank and every restart tokenizes
    identically. The files are tokenized once into the token cache (launcher.run.token_cache;
    `mplaunch prepare` does it ahead), or a cache found checked (CRC-32, rebuilt if it fails), by
    rank 0 while the others wait at `barrier`; then every rank maps it read-only. A rank that finds
    no cache after the barrier (one on another node's disk, or rank 0's fallback directory) writes
    its own; another node's cache is checked for size only.
    """
    d = plan.recipe.data
    if d.target is not None:  # the user's dataset, read by row (launcher.worker.user_data)
        from launcher.worker import user_data

        found = user_data.load(plan)
        if isinstance(found, user_data.DatasetRows):  # LM rows: Batches fills the labels, or masks
            return Tokens(found, plan.vocab_size, found.mask_id, found.special_ids)
        return found  # items with labels, collated as records (an examples.Examples)
    # Every rank at once: the content this run reads, which its checkpoints record (launcher.plan.resume).
    digests.pin_data_content(plan.data_paths)
    if plan.model.task in tasks.PER_RECORD:
        return _examples(plan)
    if d.kind == "synthetic":
        gen = torch.Generator().manual_seed(plan.recipe.train.seed)
        # Ids below len(SPECIALS) are reserved so the MLM mask id is never a real token.
        ids = torch.randint(len(SPECIALS), plan.vocab_size, (d.num_samples, d.seq_len), generator=gen)
        return Tokens(ArrayRows(ids.numpy()), plan.vocab_size, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    tok_dir = Path(plan.tokenizer_dir) if plan.tokenizer_dir else RunDir.from_plan(plan).tokenizer
    masked = plan.model.task == tasks.MASKED_LM
    data_sha = token_cache.data_digest(plan.data_paths)  # the pinned content's
    cache = None
    if rank == 0:  # also checks the cache's CRC-32, once per start
        tokenizer = token_cache.checked_tokenizer(plan, tok_dir, masked)
        cache = token_cache.open_cache(plan, tok_dir, tokenizer, data_sha, verify=True)
    barrier()
    if cache is None:
        tokenizer = token_cache.checked_tokenizer(plan, tok_dir, masked)
        cache = token_cache.open_cache(plan, tok_dir, tokenizer, data_sha, verify=False)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), cache.separator_id
    framing = (cls_id if cls_id is not None else 0, sep_id if sep_id is not None else 0) if masked else None
    pad_id = next((i for i in map(tokenizer.token_to_id, PAD_TOKENS) if i is not None), 0)
    rows = StreamRows(cache, d.seq_len, framing, pack=d.pack, pad_id=pad_id)
    specials = tuple(i for i in (tokenizer.token_to_id(t) for t in SPECIALS) if i is not None)
    mask_id = tokenizer.token_to_id("[MASK]")
    return Tokens(rows, tokenizer.get_vocab_size(), -1 if mask_id is None else mask_id, specials)


def _examples(plan: Plan) -> Any:
    """The records of a per-record task as rows (launcher.worker.examples), with the run's tokenizer."""
    from launcher.worker import examples

    if plan.recipe.data.kind == "synthetic":
        return examples.load(plan, None)
    tok_dir = Path(plan.tokenizer_dir) if plan.tokenizer_dir else RunDir.from_plan(plan).tokenizer
    return examples.load(plan, token_cache.checked_tokenizer(plan, tok_dir, masked=False))


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Split:
    """Which rows are training and which evaluation samples (a fixed, seeded split)."""

    train: np.ndarray
    eval: np.ndarray


def split(num_samples: int, eval_fraction: float, seed: int) -> Split:
    order = np.random.default_rng([seed, 7]).permutation(num_samples)
    n_eval = data_check.held_out(num_samples, eval_fraction)
    return Split(train=np.sort(order[n_eval:]), eval=np.sort(order[:n_eval]))


def documents(tokens: Tokens, plan: Plan) -> bool:
    """The rows are windows of packed documents whose starts a causal LM can be told (README "Batches"):
    causal-lm on a token stream with data.pack true. Masked-LM rows keep today's stream, no boundaries."""
    rows = getattr(tokens, "ids", None)  # the records of a per-record task have none
    packed = isinstance(rows, StreamRows) and rows.pack and rows.framing is None
    return packed and plan.model.task == tasks.CAUSAL_LM


class Batches:
    """Micro-batches of one rank in the order of the global-batch schedule.

    Args:
        tokens: every sample.
        rows: the sample rows to draw from (training or evaluation).
        plan: the run's plan (batch triple, seed, model kind, masking).
        rank: this data-parallel rank.
        evaluation: the held-out rows, read micro-batch by micro-batch (`collate`), so they
            need not fill a global batch.
        positions: give `position_ids` restarting at each document, and -100 as the label of
            each document's first token (README "Batches"): for rows of packed documents
            (`documents`) and a model that keeps them apart (model_setup.document_positions).
    """

    def __init__(
        self,
        tokens: Tokens,
        rows: np.ndarray,
        plan: Plan,
        rank: int,
        evaluation: bool = False,
        positions: bool = False,
    ) -> None:
        assert not positions or documents(tokens, plan), "position_ids need rows of packed documents"
        b = plan.batch
        self.tokens, self.rows, self.rank, self.positions = tokens, rows, rank, positions
        self.micro, self.accum, self.world, self.global_ = (
            b.micro_batch_size,
            b.grad_accum,
            b.world_size,
            b.global_batch_size,
        )
        self.seed = plan.recipe.train.seed
        self.mask_prob = plan.recipe.data.mask_prob
        self.causal = plan.model.task == tasks.CAUSAL_LM
        self.pin = plan.device == "cuda"
        self.steps_per_epoch = len(rows) // self.global_
        self._order_epoch: int | None = None
        self._order = rows
        if self.steps_per_epoch == 0 and not evaluation:
            d = plan.recipe.data
            more = "raise data.num_samples" if d.kind == "synthetic" and d.target is None else "add data"
            held = f", or lower data.eval_fraction ({d.eval_fraction:g})" if d.eval_fraction else ""
            raise ValueError(
                f"{len(rows)} training samples cannot fill one global batch of {self.global_}; "
                f"lower train.global_batch_size or {more}{held}"
            )

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step `step`."""
        return divmod(step, self.steps_per_epoch)

    def step_rows(self, step: int) -> list[np.ndarray]:
        """The sample rows of each of this rank's micro-batches in optimizer step `step`."""
        epoch, k = self.position(step)
        batch = self._epoch_order(epoch)[k * self.global_ : (k + 1) * self.global_]
        starts = ((j * self.world + self.rank) * self.micro for j in range(self.accum))
        return [batch[s : s + self.micro] for s in starts]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's seeded shuffle of the rows, computed once per epoch, not once per step."""
        if self._order_epoch != epoch:
            self._order = self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))]
            self._order_epoch = epoch
        return self._order

    def for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, _ = self.position(step)
        return [self.collate(rows, epoch) for rows in self.step_rows(step)]

    def collate(self, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """The micro-batch of these sample rows: only they are read from the token stream."""
        if isinstance(self.tokens, Examples):  # sequence-classification, sft: one record per row
            return self.tokens.collate(rows)
        ids, attention = self.tokens.ids.take(rows)
        if self.positions:
            assert isinstance(self.tokens.ids, StreamRows)
            position_ids = self.tokens.ids.positions(rows)
            # A document's first token would be predicted from the previous document's last one: no
            # loss there. The row's own first token is never a target (the model shifts).
            labels = ids.masked_fill(position_ids == 0, -100)
            batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
        elif self.causal:
            labels = ids.clone() if attention is None else ids.masked_fill(attention == 0, -100)
            batch = {"input_ids": ids, "labels": labels}
        else:
            batch = self._mask(ids, rows, epoch, attention)
        if attention is not None:
            batch["attention_mask"] = attention
        return batch

    def _mask(
        self, ids: torch.Tensor, rows: np.ndarray, epoch: int, attention: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        # BERT's recipe: of the chosen positions 80% become [MASK], 10% a random
        # token, 10% stay; the loss is taken on chosen positions only.
        draws = torch.from_numpy(
            np.stack(
                [np.random.default_rng([self.seed, epoch, int(r)]).random((3, ids.shape[1])) for r in rows]
            )
        )
        special = torch.isin(ids, torch.tensor(self.tokens.special_ids))
        if attention is not None:  # padding is never a target, whatever its id
            special |= attention == 0
        chosen = (draws[:, 0] < self.mask_prob) & ~special
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        inputs = ids.clone()
        to_mask = chosen & (draws[:, 1] < 0.8)
        to_random = chosen & (draws[:, 1] >= 0.8) & (draws[:, 1] < 0.9)
        inputs[to_mask] = self.tokens.mask_id
        random_ids = (draws[:, 2] * (self.tokens.vocab_size - len(SPECIALS))).long() + len(SPECIALS)
        inputs[to_random] = random_ids[to_random]
        return {"input_ids": inputs, "labels": labels}


class _Steps(torch.utils.data.Dataset):
    def __init__(self, batches: Batches, start_step: int, end_step: int) -> None:
        self.batches, self.start, self.end = batches, start_step, end_step

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return self.batches.for_step(self.start + i)


def loader(
    batches: Batches, start_step: int, end_step: int, num_workers: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Each optimizer step's micro-batches, from `start_step` on.

    With data.num_workers > 0 worker processes prepare steps ahead; on CUDA the
    batches arrive in pinned memory so the copy to the GPU can be asynchronous.
    """
    return iter(
        torch.utils.data.DataLoader(
            _Steps(batches, start_step, end_step),
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=batches.pin,
            prefetch_factor=4 if num_workers else None,
            # Its own generator: a DataLoader otherwise draws its worker seed from torch's global
            # RNG, one draw more for a resumed run than for one that never stopped.
            generator=torch.Generator().manual_seed(batches.seed + start_step),
        )
    )
