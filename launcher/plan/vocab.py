"""The vocabulary a run will have, known to the plan before any worker starts.

One answer for the model builder, the memory planner and the FLOP counter:
`model.vocab_size` when the recipe sets it; for synthetic data (and a data.target
without data.tokenizer) the built-in model's default; else the size of the tokenizer
the workers will load (the recipe's `data.tokenizer`, the run directory's copy on a
resume, or the one trained on the data files). A tokenizer trained on the data is cached by the
content of the files (MPLAUNCH_CACHE, default ~/.cache/mplaunch) and trained by
the launcher before it resolves a plan (`prepare`), so a real run always knows
its exact size; a dry run on a cold cache shows the trainer's cap as an upper bound.

Light side: tokenizer files are read as JSON; the `tokenizers` library is
imported only to train one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.plan import records
from launcher.recipe import tasks
from launcher.recipe.families import default_vocab_size

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# A causal LM's trained tokenizer (byte-level BPE, as GPT-2's) has one special token: it ends
# every document, and pads a padded row (under an attention mask of 0).
END_OF_TEXT = "<|endoftext|>"
MAX_TRAINED_VOCAB = 8192
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Vocab:
    """The vocabulary size of a run and where it comes from."""

    size: int
    source: str  # says so when the size is only an upper bound (a tokenizer not trained yet)
    exact: bool = True  # false when no tokenizer file decided it (the trainer's cap, or a default)


def resolve(
    recipe: Recipe, data_paths: tuple[str, ...], tokenizer_dir: str | None, run_tokenizer: Path
) -> Vocab:
    """The run's vocabulary.

    Args:
        recipe: the validated recipe.
        data_paths: its data files, resolved.
        tokenizer_dir: the recipe's `data.tokenizer`, resolved, or None.
        run_tokenizer: RUN_DIR's tokenizer directory (a resumed run reuses the one it trained).
    """
    m, d = recipe.model, recipe.data
    if m.vocab_size is not None:
        return Vocab(m.vocab_size, "model.vocab_size")
    if d.kind == "synthetic" and (d.target is None or tokenizer_dir is None):
        # A data.target without data.tokenizer: the recipe rules require the size from the model.
        what = "data.target" if d.target is not None else "synthetic data"
        return Vocab(default_vocab_size(m.name), f"the {m.name or 'default'} vocabulary ({what})")
    if tokenizer_dir is not None:
        size = tokenizer_size(Path(tokenizer_dir))
        if size is None:
            return Vocab(default_vocab_size(m.name), f"{tokenizer_dir} has no {TOKENIZER_FILE}", exact=False)
        return Vocab(size, f"the tokenizer in {tokenizer_dir}")
    for where, label in (
        (run_tokenizer, "the run's trained tokenizer"),
        (trained_dir(recipe, data_paths), "the tokenizer trained on the data"),
    ):
        size = tokenizer_size(where)
        if size is not None:
            return Vocab(size, label)
    return Vocab(
        MAX_TRAINED_VOCAB, "the trained tokenizer's cap; the tokenizer is trained at launch", exact=False
    )


def of_target(recipe: Recipe, data_vocab: Vocab) -> Vocab:
    """The vocabulary of a user's model: model.kwargs.vocab_size if set, else the data's.

    Synthetic data has no tokenizer, so model.kwargs.vocab_size decides it (ids are drawn below
    it). With text data the tokenizer decides; model.kwargs.vocab_size may be larger (padded
    embeddings) but not smaller, which is refused here when the plan knows the tokenizer's size
    and by the worker (launcher.worker.data) when it only knows an upper bound.

    Raises:
        UserError: model.kwargs.vocab_size is no positive whole number, or smaller than the data's.
    """
    given = recipe.model.kwargs.get("vocab_size")
    if given is None:
        return data_vocab
    key = "model.kwargs.vocab_size"
    lowest = len(SPECIALS) + 1 if recipe.data.kind == "synthetic" else 1
    if isinstance(given, bool) or not isinstance(given, int) or given < lowest:
        raise UserError(f"{key}: expected a whole number of at least {lowest}, got {given!r}")
    if recipe.data.target is not None and recipe.data.tokenizer is None:
        return Vocab(given, f"{key}; data.target's ids must be below it")
    if recipe.data.kind == "synthetic" and recipe.data.target is None:
        return Vocab(given, f"{key}; synthetic ids are drawn below it")
    if data_vocab.exact and given < data_vocab.size:
        raise UserError(
            f"{key}: {given} is smaller than the data's vocabulary {data_vocab.size} ({data_vocab.source}); "
            f"set it to at least {data_vocab.size}, or leave it out: a factory that takes vocab_size is given "
            "the data's"
        )
    return Vocab(given, f"{key}; the data's is {data_vocab.size}, {data_vocab.source}", data_vocab.exact)


def tokenizer_size(directory: Path) -> int | None:
    """Embedding rows a tokenizer needs (its largest id + 1), read from tokenizer.json; None without one."""
    path = directory / TOKENIZER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none there (or unreadable): the workers will say more
        return None
    vocab = data.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def trained_dir(recipe: Recipe, data_paths: tuple[str, ...]) -> Path:
    """Where the tokenizer trained on these files is cached (keyed by their content).

    The trainer breaks frequency ties in no fixed order, so two trainings on the
    same files can number tokens differently; one training per data set is kept
    and every run on those files gets a copy, so comparable runs see the same ids.
    """
    key = hashlib.sha256()
    parts = (
        _tokenizers_version(),
        algorithm(recipe),
        recipe.data.kind,
        *text_fields(recipe),
        str(MAX_TRAINED_VOCAB),
    )
    for part in parts:
        key.update(part.encode() + b"\0")
    records.hash_paths(key, data_paths)
    cache_root = Path(os.environ.get("MPLAUNCH_CACHE", Path.home() / ".cache" / "mplaunch"))
    return cache_root / "tokenizers" / key.hexdigest()[:24]


def needs_training(recipe: Recipe) -> bool:
    """A tokenizer must be trained on the data files (no `data.tokenizer` given)."""
    return recipe.data.kind != "synthetic" and recipe.data.tokenizer is None


def prepare(recipe: Recipe, data_paths: tuple[str, ...], texts: list[str] | None = None) -> Path:
    """Train the data's tokenizer into the cache unless it is there; return its directory.

    An unwritable cache falls back to a directory of this process's own.

    Raises:
        OSError, ValueError: a data file cannot be read or holds no text.
    """
    cached = trained_dir(recipe, data_paths)
    if (cached / TOKENIZER_FILE).exists():
        return cached
    texts = read_texts(recipe, data_paths) if texts is None else texts
    train = _train_bpe if algorithm(recipe) == "bpe" else _train_wordpiece
    try:
        train(texts, cached)
    except OSError:
        import tempfile

        cached = Path(tempfile.mkdtemp(prefix="mplaunch-tokenizer-"))
        train(texts, cached)
    return cached


def algorithm(recipe: Recipe) -> str:
    """The tokenizer trained for this recipe: byte-level BPE for a causal LM (causal-lm, sft), as
    GPT-2's, which never meets an unknown character; else WordPiece with BERT's specials.

    The task as the recipe alone decides it: a tokenizer is trained before the plan reads model.hf,
    which brings its own tokenizer anyway."""
    return "bpe" if tasks.resolve(recipe) in tasks.CAUSAL else "wordpiece"


def read_texts(recipe: Recipe, data_paths: tuple[str, ...]) -> list[str]:
    """Every text of the data files (launcher.plan.records): a text file's lines, or each record's
    `data.text_field`; for data.task sft, its prompt and response joined by a space.

    Raises:
        OSError, ValueError: a data file cannot be read, lacks a field or holds no record.
    """
    fields = text_fields(recipe)
    found = records.read_records(recipe, data_paths, fields)
    return [" ".join(str(r[f]) for f in fields) for r in found]


def text_fields(recipe: Recipe) -> tuple[str, ...]:
    """The record fields the tokenizer is trained on: prompt and response for sft, else the text."""
    d = recipe.data
    # tasks.resolve never turns auto into sft, so the recipe's own word decides.
    return (d.prompt_field, d.response_field) if d.task == "sft" else (d.text_field,)


def _train_wordpiece(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=MAX_TRAINED_VOCAB, special_tokens=list(SPECIALS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    _save(tokenizer, out_dir)


def _train_bpe(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_TRAINED_VOCAB,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    _save(tokenizer, out_dir)


def _save(tokenizer: Any, out_dir: Path) -> None:  # tokenizers.Tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{TOKENIZER_FILE}.{os.getpid()}.tmp"
    tokenizer.save(str(tmp))
    tmp.replace(out_dir / TOKENIZER_FILE)


def _tokenizers_version() -> str:
    try:
        return metadata.version("tokenizers")
    except metadata.PackageNotFoundError:
        return "none"
