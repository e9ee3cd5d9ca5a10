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

import numpy as np
import torch

from launcher import tasks, vocab
from launcher.plan import Plan
from launcher.rundir import RunDir

SPECIALS = vocab.SPECIALS


@dataclass(frozen=True)
class Tokens:
    """Token ids of every sample, one row each, plus what masking needs."""

    ids: torch.Tensor  # (num_samples, seq_len) int64
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]


def load_tokens(plan: Plan, rank: int, barrier: Callable[[], None]) -> Tokens:
    """The samples of the run: synthetic tokens, or the recipe's files tokenized.

    A tokenizer trained on the files is written once, by rank 0, into
    RUN_DIR/tokenizer and loaded from there on resume, so every rank and every
    restart tokenizes identically.
    """
    d = plan.recipe.data
    if d.kind == "synthetic":
        gen = torch.Generator().manual_seed(plan.recipe.train.seed)
        # Ids below len(SPECIALS) are reserved so the MLM mask id is never a real token.
        ids = torch.randint(len(SPECIALS), plan.vocab_size, (d.num_samples, d.seq_len), generator=gen)
        return Tokens(ids, plan.vocab_size, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    tok_dir = Path(plan.tokenizer_dir) if plan.tokenizer_dir else RunDir.from_plan(plan).tokenizer
    if plan.tokenizer_dir is None and rank == 0 and not (tok_dir / "tokenizer.json").exists():
        _copy_trained_tokenizer(plan, tok_dir)
    barrier()
    tokenizer = _load_tokenizer(tok_dir)
    if tokenizer.get_vocab_size() > plan.vocab_size:
        key = "model.kwargs.vocab_size" if plan.recipe.model.target else "model.vocab_size"
        raise ValueError(
            f"the tokenizer in {tok_dir} has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is "
            f"{plan.vocab_size} ({plan.vocab_source}); raise {key} or leave it unset"
        )
    masked = tasks.resolve(plan.recipe) == tasks.MASKED_LM
    mask_id = tokenizer.token_to_id("[MASK]")
    if masked and mask_id is None:
        raise ValueError(
            f"the tokenizer in {tok_dir} has no [MASK] token; data.task masked-lm needs one "
            "(a causal LM trains with data.task=causal-lm)"
        )
    ids = _chunk(tokenizer, vocab.read_texts(plan.recipe, plan.data_paths), d.seq_len, framed=masked)
    specials = tuple(i for i in (tokenizer.token_to_id(t) for t in SPECIALS) if i is not None)
    return Tokens(ids, tokenizer.get_vocab_size(), -1 if mask_id is None else mask_id, specials)


def _copy_trained_tokenizer(plan: Plan, out_dir: Path) -> None:
    """Put the tokenizer trained on the recipe's files (vocab.prepare, cached) into `out_dir`."""
    import shutil

    cached = vocab.prepare(plan.recipe, plan.data_paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached / vocab.TOKENIZER_FILE, out_dir / "tokenizer.json.tmp")
    (out_dir / "tokenizer.json.tmp").replace(out_dir / vocab.TOKENIZER_FILE)


def _load_tokenizer(tok_dir: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    if (tok_dir / "tokenizer.json").exists():
        return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # A directory written by transformers' save_pretrained without a fast tokenizer file.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir)).backend_tokenizer


# What separates documents in the token stream, by tokenizer family: BERT's, then the
# end-of-text tokens of GPT-2 style BPE, SentencePiece and Llama tokenizers.
SEPARATORS = ("[SEP]", "<|endoftext|>", "</s>", "<eos>")


def _chunk(tokenizer, texts: list[str], seq_len: int, framed: bool) -> torch.Tensor:
    """Concatenate the texts (a separator token between them) and cut rows of seq_len tokens.

    Args:
        framed: masked-LM rows, [CLS] ... [SEP] as BERT reads them; otherwise (causal-LM)
            plain windows of the stream, each document ending in its separator.
    """
    sep_id = next((i for i in map(tokenizer.token_to_id, SEPARATORS) if i is not None), None)
    cls_id = tokenizer.token_to_id("[CLS]")
    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        if sep_id is not None:
            stream.append(sep_id)
    body = seq_len - 2 if framed else seq_len
    rows = len(stream) // body
    if rows == 0:
        raise ValueError(
            f"the data holds {len(stream)} tokens, fewer than one sample of data.seq_len {seq_len}"
        )
    arr = np.asarray(stream[: rows * body], dtype=np.int64).reshape(rows, body)
    if not framed:
        return torch.from_numpy(arr)
    cls = np.full((rows, 1), cls_id if cls_id is not None else 0, dtype=np.int64)
    sep = np.full((rows, 1), sep_id if sep_id is not None else 0, dtype=np.int64)
    return torch.from_numpy(np.concatenate([cls, arr, sep], axis=1))


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Split:
    """Which rows are training and which evaluation samples (a fixed, seeded split)."""

    train: np.ndarray
    eval: np.ndarray


def split(num_samples: int, eval_fraction: float, seed: int) -> Split:
    order = np.random.default_rng([seed, 7]).permutation(num_samples)
    n_eval = int(num_samples * eval_fraction)
    return Split(train=np.sort(order[n_eval:]), eval=np.sort(order[:n_eval]))


class Batches:
    """Micro-batches of one rank in the order of the global-batch schedule.

    Args:
        tokens: every sample.
        rows: the sample rows to draw from (training or evaluation).
        plan: the run's plan (batch triple, seed, model kind, masking).
        rank: this data-parallel rank.
        evaluation: the held-out rows, read micro-batch by micro-batch (`collate`), so they
            need not fill a global batch.
    """

    def __init__(
        self, tokens: Tokens, rows: np.ndarray, plan: Plan, rank: int, evaluation: bool = False
    ) -> None:
        b = plan.batch
        self.tokens, self.rows, self.rank = tokens, rows, rank
        self.micro, self.accum, self.world, self.global_ = (
            b.micro_batch_size,
            b.grad_accum,
            b.world_size,
            b.global_batch_size,
        )
        self.seed = plan.recipe.train.seed
        self.mask_prob = plan.recipe.data.mask_prob
        self.causal = tasks.resolve(plan.recipe) == tasks.CAUSAL_LM
        self.pin = plan.device == "cuda"
        self.steps_per_epoch = len(rows) // self.global_
        self._order_epoch: int | None = None
        self._order = rows
        if self.steps_per_epoch == 0 and not evaluation:
            raise ValueError(
                f"{len(rows)} samples cannot fill one global batch of {self.global_}; "
                "add data, lower train.global_batch_size, or raise data.num_samples"
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
        ids = self.tokens.ids[torch.from_numpy(rows)]
        return {"input_ids": ids, "labels": ids.clone()} if self.causal else self._mask(ids, rows, epoch)

    def _mask(self, ids: torch.Tensor, rows: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        # BERT's recipe: of the chosen positions 80% become [MASK], 10% a random
        # token, 10% stay; the loss is taken on chosen positions only.
        draws = torch.from_numpy(
            np.stack(
                [np.random.default_rng([self.seed, epoch, int(r)]).random((3, ids.shape[1])) for r in rows]
            )
        )
        special = torch.isin(ids, torch.tensor(self.tokens.special_ids))
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
