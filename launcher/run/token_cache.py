"""The token stream of a run's data files, tokenized once into a memory-mapped cache.

Every document's ids, each followed by the tokenizer's separator token, are
concatenated into one flat binary file (uint16 when every id fits, else uint32),
with the document boundaries beside it (uint64, one per document and one more) and a
small meta.json. The directory is MPLAUNCH_CACHE/tokens/KEY (default
~/.cache/mplaunch), KEY a content hash of the tokenizer, the data files, data.kind,
data.text_field, the tokenizers version and FORMAT_VERSION: the same files and
tokenizer find the same cache, a change to either makes a new one. It is written
under a temporary name and renamed, so a reader finds a complete cache or none.
meta.json holds both files' CRC-32, computed as they are written; rank 0 checks them once
per start (`ensure`), so a file edited in place, even at its size, is rebuilt, not read.
The stream depends on neither data.seq_len nor data.pack; the workers cut rows
from it (launcher.worker.data), reading only the pages a batch needs.

Light side (`mplaunch prepare` writes it): numpy, tokenizers and transformers are
imported only inside the functions that use them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.plan import digests, vocab
from launcher.plan.resolve import Plan
from launcher.recipe.schema import Recipe
from launcher.rundir import checkpoint
from launcher.rundir.layout import RunDir

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

FORMAT_VERSION = 2  # 2: meta.json holds the files' CRC-32
META_FILE = "meta.json"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.bin"
# What separates documents in the stream, by tokenizer family: BERT's, then the
# end-of-text tokens of GPT-2 style BPE, SentencePiece and Llama tokenizers.
SEPARATORS = ("[SEP]", "<|endoftext|>", "</s>", "<eos>")
# Documents per encode_batch call: the writer holds one chunk's ids, not the stream's.
ENCODE_CHUNK = 4096


@dataclass(frozen=True)
class TokenCache:
    """A complete cache directory, as its meta.json describes it."""

    directory: Path
    dtype: str  # "uint16" or "uint32"
    num_tokens: int
    num_documents: int
    separator_id: int | None  # the id after every document, or None (a tokenizer without one)

    @property
    def tokens_path(self) -> Path:
        return self.directory / TOKENS_FILE

    @property
    def offsets_path(self) -> Path:
        return self.directory / OFFSETS_FILE

    @property
    def size_bytes(self) -> int:
        return sum(
            p.stat().st_size for p in (self.tokens_path, self.offsets_path, self.directory / META_FILE)
        )

    def tokens(self) -> np.memmap[Any, np.dtype[Any]]:
        """The stream, memory-mapped read-only: (num_tokens,) of `dtype`."""
        import numpy as np

        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def offsets(self) -> np.memmap[Any, np.dtype[Any]]:
        """Where each document starts in the stream, then the stream's end: (num_documents + 1,) uint64.

        Document i is tokens()[offsets[i]:offsets[i + 1]], its separator included.
        """
        import numpy as np

        return np.memmap(self.offsets_path, dtype=np.uint64, mode="r", shape=(self.num_documents + 1,))


def cache_root() -> Path:
    """MPLAUNCH_CACHE, default ~/.cache/mplaunch (the trained tokenizers' cache too, launcher.plan.vocab)."""
    return Path(os.environ.get("MPLAUNCH_CACHE", Path.home() / ".cache" / "mplaunch"))


def data_digest(data_paths: tuple[str, ...]) -> str:
    """sha256 of the data files' content: the digests a checkpoint records (digests.data_content) combined."""
    return digests.content_digest(digests.data_content(data_paths))


def tokenizer_digest(tok_dir: Path, tokenizer: Tokenizer | None = None) -> str:
    """sha256 of the tokenizer: its tokenizer.json bytes, else (a directory without one, a hub
    id) the serialised form of the tokenizer loaded from it."""
    path = tok_dir / vocab.TOKENIZER_FILE
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = tokenizer if tokenizer is not None else load_tokenizer(tok_dir)
    return hashlib.sha256(loaded.to_str().encode()).hexdigest()


def directory(recipe: Recipe, data_sha: str, tokenizer_sha: str) -> Path:
    """The cache directory of this tokenizer and these files, as read by this recipe's data.kind."""
    d = recipe.data
    parts = (f"format {FORMAT_VERSION}", _tokenizers_version(), d.kind, d.text_field, tokenizer_sha, data_sha)
    key = hashlib.sha256(b"".join(part.encode() + b"\0" for part in parts))
    return cache_root() / "tokens" / key.hexdigest()[:24]


def find(where: Path, verify: bool = False) -> TokenCache | None:
    """The complete cache in `where`, or None when there is none.

    Args:
        verify: also compare both files' CRC-32 with meta.json's (reads them); else only their sizes.

    Raises:
        ValueError: the files disagree with meta.json (edited or damaged since written).
    """
    try:
        meta = json.loads((where / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT_VERSION:
        return None
    cache = TokenCache(
        where, str(meta["dtype"]), int(meta["num_tokens"]), int(meta["num_documents"]), meta["separator_id"]
    )
    width = 2 if cache.dtype == "uint16" else 4
    expected = {
        cache.tokens_path: cache.num_tokens * width,
        cache.offsets_path: (cache.num_documents + 1) * 8,
    }
    for path, size in expected.items():
        if not path.is_file() or path.stat().st_size != size:
            raise Damaged(path, f"not the {size} bytes its meta.json says")
    for path, key in ((cache.tokens_path, "tokens_crc32"), (cache.offsets_path, "offsets_crc32")):
        if verify and checkpoint.checksum(path)[1] != meta.get(key):
            raise Damaged(path, "not the content its meta.json's CRC-32 says (changed since it was written)")
    return cache


class Damaged(ValueError):
    """A cache file disagrees with its meta.json: `reason` names the file and how."""

    def __init__(self, path: Path, what: str) -> None:
        self.reason = f"{path}: {what}"
        super().__init__(f"{self.reason}; delete {path.parent} and run again")


def ensure(
    recipe: Recipe,
    data_paths: tuple[str, ...],
    tok_dir: Path,
    tokenizer: Tokenizer | None = None,
    data_sha: str | None = None,
    fallback: bool = True,
    verify: bool = True,
) -> tuple[TokenCache, bool]:
    """The token cache of these files and this tokenizer, and whether this call wrote it (unless it was there).

    An unwritable cache directory falls back to a temporary directory of this
    process, removed when it exits.

    Args:
        tok_dir: the tokenizer's directory (or hub id), as launcher.worker.data loads it.
        tokenizer: the tokenizer loaded from it, if the caller has it already.
        data_sha: data_digest(data_paths), if the caller has it already.
        fallback: write into a temporary directory when the cache is not writable
            (false: raise the OSError).
        verify: check a cache found against its CRC-32 and write it again if it fails (said in
            one line); false: check its sizes only (a rank mapping the cache rank 0 verified).

    Raises:
        OSError, ValueError: a data file cannot be read or holds no text (or, without
            `fallback`, the cache cannot be written); Damaged: without `verify`, a file's size is wrong.
    """
    sha = data_sha if data_sha is not None else data_digest(data_paths)
    tok_sha = tokenizer_digest(tok_dir, tokenizer)
    target = directory(recipe, sha, tok_sha)
    try:
        found = find(target, verify)
    except Damaged as exc:
        if not verify:
            raise
        print(f"mplaunch: warning: {exc.reason}; rebuilding the token cache from the data files", flush=True)
        _discard(target)
        found = None
    if found is not None:
        return found, False
    texts = vocab.read_texts(recipe, data_paths)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tok_dir)
    meta = {
        "tokenizer": str(tok_dir),
        "tokenizer_sha256": tok_sha,
        "data_sha256": sha,
        "data_kind": recipe.data.kind,
        "text_field": recipe.data.text_field,
    }
    try:
        return _write(texts, tokenizer, target, meta), True
    except OSError:
        if not fallback:
            raise
        own = Path(tempfile.mkdtemp(prefix="mplaunch-tokens-"))
        atexit.register(shutil.rmtree, own, ignore_errors=True)
        return _write(texts, tokenizer, own / target.name, meta), True


def _discard(target: Path) -> None:
    """Move a failed cache aside (readers find a complete cache or none), then delete it."""
    aside = target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}.failed"
    with contextlib.suppress(OSError):  # another process moved it first
        target.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def tokenizer_of(plan: Plan) -> Path:
    """The tokenizer a run of this plan tokenizes with (its workers load it from RUN_DIR/tokenizer,
    which holds the same bytes): data.tokenizer or model.hf's, else the run's copy of the trained
    one, else the trained one in the cache (call plan.prepare_vocab first)."""
    if plan.tokenizer_dir is not None:
        return Path(plan.tokenizer_dir)
    run_copy = RunDir.from_plan(plan).tokenizer
    if (run_copy / vocab.TOKENIZER_FILE).is_file():
        return run_copy
    return vocab.trained_dir(plan.recipe, plan.data_paths)


def load_tokenizer(tok_dir: Path) -> Tokenizer:
    """The fast tokenizer in `tok_dir` (tokenizer.json), or the one transformers builds from it."""
    from tokenizers import Tokenizer

    if (tok_dir / vocab.TOKENIZER_FILE).exists():
        return Tokenizer.from_file(str(tok_dir / vocab.TOKENIZER_FILE))
    # A directory written by transformers' save_pretrained without a fast tokenizer file.
    from transformers import AutoTokenizer

    backend: Tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)).backend_tokenizer
    return backend


def separator_id(tokenizer: Tokenizer) -> int | None:
    """The token that ends each document in the stream (SEPARATORS, first found), or None."""
    return next((i for i in map(tokenizer.token_to_id, SEPARATORS) if i is not None), None)


def _write(texts: list[str], tokenizer: Tokenizer, target: Path, meta: dict[str, str]) -> TokenCache:
    import numpy as np

    sep = separator_id(tokenizer)
    bound = max([tokenizer.get_vocab_size(), *(i + 1 for i in tokenizer.get_added_tokens_decoder())])
    dtype = np.uint16 if bound <= 2**16 else np.uint32
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed writer's, with this host and pid
    tmp.mkdir()
    try:
        num_tokens, crc_tokens, crc_offsets = 0, 0, zlib.crc32(np.zeros(1, dtype=np.uint64).tobytes())
        with open(tmp / TOKENS_FILE, "wb") as tokens_f, open(tmp / OFFSETS_FILE, "wb") as offsets_f:
            offsets_f.write(np.zeros(1, dtype=np.uint64).tobytes())
            for start in range(0, len(texts), ENCODE_CHUNK):
                chunk = tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK], add_special_tokens=False)
                flat: list[int] = []
                ends: list[int] = []
                for enc in chunk:
                    flat.extend(enc.ids)
                    if sep is not None:
                        flat.append(sep)
                    ends.append(num_tokens + len(flat))
                ids = np.asarray(flat, dtype=np.int64)
                assert ids.size == 0 or int(ids.max()) < bound, "an id beyond the tokenizer's vocabulary"
                written, bounds = ids.astype(dtype).tobytes(), np.asarray(ends, dtype=np.uint64).tobytes()
                tokens_f.write(written)
                offsets_f.write(bounds)
                crc_tokens, crc_offsets = zlib.crc32(written, crc_tokens), zlib.crc32(bounds, crc_offsets)
                num_tokens += ids.size
            for f in (tokens_f, offsets_f):
                f.flush()
                os.fsync(f.fileno())
        cache = TokenCache(target, np.dtype(dtype).name, num_tokens, len(texts), sep)
        crcs = {"tokens_crc32": f"{crc_tokens:08x}", "offsets_crc32": f"{crc_offsets:08x}"}
        _write_meta(tmp, cache, tokenizer, {**meta, "checksum": checkpoint.CHECKSUM, **crcs})
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        won = find(target)  # another rank or process renamed its copy first: the same bytes
        if won is None:
            raise
        return won
    return cache


def _write_meta(tmp: Path, cache: TokenCache, tokenizer: Tokenizer, extra: dict[str, str]) -> None:
    meta = {
        "format": FORMAT_VERSION,
        "dtype": cache.dtype,
        "num_tokens": cache.num_tokens,
        "num_documents": cache.num_documents,
        "separator_id": cache.separator_id,
        "tokens_file": TOKENS_FILE,
        "offsets_file": OFFSETS_FILE,
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "tokenizers": _tokenizers_version(),
        **extra,
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tokenizers_version() -> str:
    try:
        return metadata.version("tokenizers")
    except metadata.PackageNotFoundError:
        return "none"


def checked_tokenizer(plan: Plan, tok_dir: Path, masked: bool) -> Tokenizer:
    """The worker's tokenizer from `tok_dir`, checked against the plan: no id past the model's
    vocabulary, and a [MASK] token for masked-lm.

    Raises:
        ValueError: one line saying which and what to change.
    """
    if not (tok_dir / vocab.TOKENIZER_FILE).is_file():
        raise ValueError(
            f"{tok_dir} holds no {vocab.TOKENIZER_FILE}: the launcher puts the trained tokenizer there before "
            "the workers start; start runs with mplaunch"
        )
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.get_vocab_size() > plan.vocab_size:
        key = "model.kwargs.vocab_size" if plan.recipe.model.target else "model.vocab_size"
        raise ValueError(
            f"the tokenizer in {tok_dir} has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is "
            f"{plan.vocab_size} ({plan.vocab_source}); raise {key} or leave it unset"
        )
    if masked and tokenizer.token_to_id("[MASK]") is None:
        raise ValueError(
            f"the tokenizer in {tok_dir} has no [MASK] token; data.task masked-lm needs one "
            "(a causal LM trains with data.task=causal-lm)"
        )
    return tokenizer


def open_cache(plan: Plan, tok_dir: Path, tokenizer: Tokenizer, data_sha: str, verify: bool) -> TokenCache:
    """The token cache of the plan's files under this tokenizer, written first if missing (said on stdout);
    `verify` as `ensure` takes it."""
    started = time.perf_counter()
    cache, written = ensure(plan.recipe, plan.data_paths, tok_dir, tokenizer, data_sha, verify=verify)
    if written:
        print(
            f"mplaunch: tokenized {cache.num_documents} documents ({cache.num_tokens} tokens) into "
            f"{cache.directory} in {time.perf_counter() - started:.1f} s; later runs on these files map it "
            "(`mplaunch prepare` does this ahead of a run)",
            flush=True,
        )
    return cache


def place_tokenizer(plan: Plan) -> None:
    """Before the workers start: put the tokenizer trained on the recipe's files (vocab.prepare,
    cached) into RUN_DIR/tokenizer, unless the run brings one (data.tokenizer, model.hf), trains on
    synthetic data, or the directory already holds it (a resumed run keeps the one it trained with).

    Workers only read it (`checked_tokenizer`); none trains a tokenizer.

    Raises:
        UserError: a data file cannot be read or holds no text.
    """
    if plan.tokenizer_dir is not None or plan.recipe.data.kind == "synthetic":
        return
    out_dir = RunDir.from_plan(plan).tokenizer
    if (out_dir / vocab.TOKENIZER_FILE).exists():
        return
    try:
        cached = vocab.prepare(plan.recipe, plan.data_paths)
    except (OSError, ValueError) as exc:
        raise UserError(f"data.paths: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached / vocab.TOKENIZER_FILE, out_dir / f"{vocab.TOKENIZER_FILE}.tmp")
    (out_dir / f"{vocab.TOKENIZER_FILE}.tmp").replace(out_dir / vocab.TOKENIZER_FILE)
