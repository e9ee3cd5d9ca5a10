"""The token cache: written once per data and tokenizer, mapped by every rank, rows identical to the old chunking."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher import cli
from launcher.plan import vocab
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.run import token_cache
from launcher.rundir.layout import RunDir
from launcher.worker import data

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "recipes" / "data" / "corpus.txt"
CPU = Hardware(cpu_count=2)
CAUSAL = ("model.name=gpt2-lm", "data.task=causal-lm")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of each test's own, so "written once" is seen from an empty cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MPLAUNCH_CACHE", str(root))
    return root


def _plan(tmp_path: Path, *overrides: str):
    """The plan as the launcher leaves it for the workers: RUN_DIR/tokenizer in place."""
    plan = resolve(load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}", *overrides]), CPU)
    token_cache.place_tokenizer(plan)
    return plan


def _every_row(tokens: data.Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    return tokens.ids.take(np.arange(len(tokens.ids)))


def _token_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tokens").iterdir() if not p.name.startswith("."))


def _old_chunk(tokenizer, texts: list[str], seq_len: int, framed: bool) -> torch.Tensor:
    """launcher.worker.data._chunk as it was before the cache: the whole stream in memory (the reference)."""
    sep_id = next((i for i in map(tokenizer.token_to_id, token_cache.SEPARATORS) if i is not None), None)
    cls_id = tokenizer.token_to_id("[CLS]")
    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        if sep_id is not None:
            stream.append(sep_id)
    body = seq_len - 2 if framed else seq_len
    rows = len(stream) // body
    arr = np.asarray(stream[: rows * body], dtype=np.int64).reshape(rows, body)
    if not framed:
        return torch.from_numpy(arr)
    cls = np.full((rows, 1), cls_id if cls_id is not None else 0, dtype=np.int64)
    sep = np.full((rows, 1), sep_id if sep_id is not None else 0, dtype=np.int64)
    return torch.from_numpy(np.concatenate([cls, arr, sep], axis=1))


def _run_tokenizer(plan):
    return token_cache.load_tokenizer(Path(plan.run_dir) / "tokenizer")


# --------------------------------------------------------------------------- the rows


@pytest.mark.parametrize(
    ("overrides", "framed"), [((), True), (CAUSAL, False)], ids=["masked-lm", "causal-lm"]
)
def test_rows_are_the_in_memory_chunking_of_before(
    tmp_path: Path, overrides: tuple[str, ...], framed: bool
) -> None:
    plan = _plan(tmp_path, *overrides)
    tokens = data.load_tokens(plan, 0, lambda: None)
    old = _old_chunk(_run_tokenizer(plan), vocab.read_texts(plan.recipe, plan.data_paths), 64, framed)
    ids, mask = _every_row(tokens)
    assert mask is None  # packed rows hold no padding
    assert ids.dtype == torch.int64
    assert torch.equal(ids, old)
    assert tokens.ids.shape == tuple(old.shape)
    # A few rows in any order read the same as the whole: a batch reads only its rows.
    some = np.array([len(old) - 1, 3, 0, 500])
    assert torch.equal(tokens.ids.take(some)[0], old[torch.from_numpy(some)])


def test_batches_are_bitwise_those_of_the_in_memory_rows(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    tokens = data.load_tokens(plan, 0, lambda: None)
    old = _old_chunk(_run_tokenizer(plan), vocab.read_texts(plan.recipe, plan.data_paths), 64, True)
    before = data.Tokens(data.ArrayRows(old.numpy()), tokens.vocab_size, tokens.mask_id, tokens.special_ids)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    for step in (0, 5, 200):
        new = data.Batches(tokens, rows.train, plan, 1).for_step(step)
        ref = data.Batches(before, rows.train, plan, 1).for_step(step)
        for a, b in zip(new, ref, strict=True):
            assert a.keys() == b.keys() == {"input_ids", "labels"}
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stream_file_is_the_concatenated_documents(tmp_path: Path, cache: Path) -> None:
    plan = _plan(tmp_path, *CAUSAL)
    data.load_tokens(plan, 0, lambda: None)
    (where,) = _token_dirs(cache)
    meta = json.loads((where / "meta.json").read_text())
    texts = vocab.read_texts(plan.recipe, plan.data_paths)
    tokenizer = _run_tokenizer(plan)
    sep = token_cache.separator_id(tokenizer)  # <|endoftext|> of the BPE tokenizer a causal LM trains
    assert sep is not None
    expected = [i for enc in tokenizer.encode_batch(texts, add_special_tokens=False) for i in [*enc.ids, sep]]
    stream = np.fromfile(where / "tokens.bin", dtype=np.uint16)
    assert stream.tolist() == expected
    offsets = np.fromfile(where / "offsets.bin", dtype=np.uint64)
    assert (len(offsets), int(offsets[0]), int(offsets[-1])) == (len(texts) + 1, 0, len(expected))
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == len(texts)
    assert (meta["dtype"], meta["separator_id"], meta["format"]) == (
        "uint16",
        sep,
        token_cache.FORMAT_VERSION,
    )
    assert meta["tokenizer_sha256"] and meta["data_sha256"]


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"[SEP]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[SEP]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    corpus = tmp_path / "big.txt"
    corpus.write_text("w69999 w1 w65536\nw70000\n")  # w70000 is unknown: [SEP]
    recipe = load(ROOT / "recipes" / "bert_tiny.yaml", [f"data.paths=[{json.dumps(str(corpus))}]"])
    found, written = token_cache.ensure(recipe, (str(corpus),), tok_dir)
    assert written and found.dtype == "uint32"
    assert found.tokens().tolist() == [70_000, 2, 65_537, 0, 0, 0]
    assert found.offsets().tolist() == [0, 4, 6]


# --------------------------------------------------------------------------- written once, keyed by content


def test_the_cache_is_written_once_and_then_only_mapped(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = data.load_tokens(_plan(tmp_path / "a"), 0, lambda: None)
    assert "mplaunch: tokenized 1200 documents" in capsys.readouterr().out
    (where,) = _token_dirs(cache)
    written = (where / "tokens.bin").stat().st_mtime_ns

    def no_reading(*_: object) -> list[str]:
        raise AssertionError("the data was read and tokenized again")

    monkeypatch.setattr(vocab, "read_texts", no_reading)
    again = data.load_tokens(_plan(tmp_path / "b"), 0, lambda: None)  # another run, same files
    assert capsys.readouterr().out == ""
    assert isinstance(again.ids, data.StreamRows)
    assert isinstance(again.ids.stream, np.memmap)  # mapped, not loaded
    assert torch.equal(_every_row(first)[0], _every_row(again)[0])
    assert _token_dirs(cache) == [where]
    assert (where / "tokens.bin").stat().st_mtime_ns == written


def test_the_key_follows_the_data_and_the_tokenizer(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text())
    tok_a, tok_b = tmp_path / "tok_a", tmp_path / "tok_b"
    lines = CORPUS.read_text().splitlines()
    vocab._train_wordpiece(lines[:300], tok_a)
    vocab._train_wordpiece(lines[300:600], tok_b)
    recipe = load(ROOT / "recipes" / "bert_tiny.yaml", [f"data.paths=[{json.dumps(str(corpus))}]"])

    def key(tok: Path, *overrides: str) -> Path:
        r = load(ROOT / "recipes" / "bert_tiny.yaml", [f"data.paths=[{json.dumps(str(corpus))}]", *overrides])
        return token_cache.directory(
            r, token_cache.data_digest((str(corpus),)), token_cache.tokenizer_digest(tok)
        )

    base = key(tok_a)
    assert key(tok_a) == base  # a pure function of the content
    assert key(tok_a, "data.seq_len=128", "data.pack=false") == base  # rows are cut at load, not stored
    assert key(tok_b) != base
    assert key(tok_a, "data.kind=jsonl") != base
    assert key(tok_a, "data.kind=jsonl", "data.text_field=body") != key(tok_a, "data.kind=jsonl")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((tok_a / "tokenizer.json").read_bytes())
    assert key(copy) == base  # the run directory's copy of a trained tokenizer finds its cache
    corpus.write_text(CORPUS.read_text() + "one more document\n")
    assert key(tok_a) != base
    found, written = token_cache.ensure(recipe, (str(corpus),), tok_a)
    assert written and found.num_documents == len(lines) + 1


def test_a_damaged_cache_is_named_not_misread(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(tmp_path)
    first = _every_row(data.load_tokens(plan, 0, lambda: None))[0]
    (where,) = _token_dirs(cache)
    with open(where / "tokens.bin", "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    # A rank mapping what rank 0 checked checks the sizes only: named, never misread.
    with pytest.raises(
        ValueError, match=rf"tokens.bin: not the \d+ bytes its meta.json says; delete {where}"
    ):
        data.load_tokens(plan, 1, lambda: None)
    # Rank 0 checks the cache it opens and writes a damaged one again (tests/worker/test_data_integrity.py).
    assert torch.equal(_every_row(data.load_tokens(plan, 0, lambda: None))[0], first)
    assert (
        "bytes its meta.json says; rebuilding the token cache from the data files" in capsys.readouterr().out
    )


def test_an_unwritable_cache_falls_back_to_a_directory_of_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # mkdir under a file fails, also for root
    tok_dir = vocab.prepare(load(ROOT / "recipes" / "bert_tiny.yaml"), (str(CORPUS),))
    monkeypatch.setenv("MPLAUNCH_CACHE", str(blocked))
    recipe = load(ROOT / "recipes" / "bert_tiny.yaml")
    found, written = token_cache.ensure(recipe, (str(CORPUS),), tok_dir)
    assert written
    assert found.directory.parent.name.startswith("mplaunch-tokens-")
    assert found.num_documents == 1200 and found.tokens_path.is_file()
    with pytest.raises(OSError):
        token_cache.ensure(recipe, (str(CORPUS),), tok_dir, fallback=False)


# --------------------------------------------------------------------------- ranks


def test_two_ranks_rank_zero_writes_and_both_map_the_same_file(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read_texts = vocab.read_texts

    def counted(*args: object) -> list[str]:
        reads.append(threading.current_thread().name)
        time.sleep(0.3)  # rank 1 must be waiting at the barrier, not tokenizing too
        return read_texts(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(vocab, "read_texts", counted)
    plan = _plan(tmp_path)
    barrier = threading.Barrier(2, timeout=60)
    out: dict[int, data.Tokens] = {}

    def rank(r: int) -> None:
        out[r] = data.load_tokens(plan, r, barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == [0, 1]
    # The launcher trains the tokenizer before the workers start; then rank 0 alone writes the token cache.
    assert reads == ["MainThread", "rank0"]
    assert len(_token_dirs(cache)) == 1
    a, b = out[0].ids, out[1].ids
    assert isinstance(a, data.StreamRows) and isinstance(b, data.StreamRows)
    assert a.cache.directory == b.cache.directory
    assert torch.equal(_every_row(out[0])[0], _every_row(out[1])[0])


def test_a_rank_that_finds_no_cache_after_the_barrier_writes_its_own(tmp_path: Path, cache: Path) -> None:
    # A rank on another node (its own MPLAUNCH_CACHE disk) or after rank 0's fallback.
    plan = _plan(tmp_path)
    data.load_tokens(plan, 0, lambda: None)  # rank 0 writes the token cache
    for where in _token_dirs(cache):
        import shutil

        shutil.rmtree(where)
    tokens = data.load_tokens(plan, 1, lambda: None)
    assert len(_token_dirs(cache)) == 1
    assert len(tokens.ids) > 1000


def test_rows_travel_to_a_spawned_loader_worker_as_a_file_name(tmp_path: Path) -> None:
    tokens = data.load_tokens(_plan(tmp_path), 0, lambda: None)
    blob = pickle.dumps(tokens.ids)
    assert len(blob) < 4096  # not the stream
    back = pickle.loads(blob)
    assert torch.equal(back.take(np.arange(20))[0], tokens.ids.take(np.arange(20))[0])


# --------------------------------------------------------------------------- data.pack false


def test_unpacked_masked_lm_rows_are_one_document_each_padded(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "data.pack=false", "data.seq_len=96", "data.mask_prob=0.5")
    tokens = data.load_tokens(plan, 0, lambda: None)
    tokenizer = _run_tokenizer(plan)
    texts = vocab.read_texts(plan.recipe, plan.data_paths)
    assert len(tokens.ids) == len(texts) == 1200
    pad, cls, sep = (tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    rows = np.arange(len(texts))
    ids, mask = tokens.ids.take(rows)
    assert mask is not None and ids.shape == mask.shape == (1200, 96)
    lengths = mask.sum(1)
    cut, padded = int(torch.argmax(lengths)), int(torch.argmin(lengths))
    assert lengths[cut] == 96 and lengths[padded] < 60  # both kinds are there
    for i in (0, 1, cut, padded, 1199):
        doc = tokenizer.encode(texts[i], add_special_tokens=False).ids[:94]
        row = [cls, *doc, sep]
        assert ids[i].tolist() == row + [pad] * (96 - len(row))
        assert mask[i].tolist() == [1] * len(row) + [0] * (96 - len(row))
    b = data.Batches(tokens, rows, plan, 0)
    batch = b.collate(rows[:400], epoch=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert torch.equal(batch["attention_mask"], mask[:400])
    padding = mask[:400] == 0
    assert (batch["labels"][padding] == -100).all()  # padding is never a target
    assert torch.equal(batch["input_ids"][padding], ids[:400][padding])  # nor masked
    chosen = batch["labels"] != -100
    assert 0.4 < chosen[~padding].float().mean().item() < 0.6


class _PaddedWithAWord:
    """Rows padded with id 9, an ordinary token (a tokenizer without [PAD] pads with id 0, often a word)."""

    shape = (64, 16)

    def __len__(self) -> int:
        return 64

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros((len(rows), 16), dtype=torch.int64)
        mask[:, :8] = 1
        return torch.where(mask == 1, torch.full_like(mask, 20), torch.full_like(mask, 9)), mask


def test_masked_lm_never_chooses_padding_even_when_its_id_is_a_word(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "data.kind=synthetic", "data.paths=[]", "data.mask_prob=0.9", "data.seq_len=16")
    tokens = data.Tokens(_PaddedWithAWord(), 100, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    batch = data.Batches(tokens, np.arange(64), plan, 0).collate(np.arange(64), epoch=0)
    assert (batch["labels"][:, 8:] == -100).all() and (batch["input_ids"][:, 8:] == 9).all()
    assert (batch["labels"][:, :8] != -100).float().mean() > 0.8


def test_unpacked_causal_lm_labels_are_the_ids_but_padding(tmp_path: Path) -> None:
    plan = _plan(tmp_path, *CAUSAL, "data.pack=false")
    tokens = data.load_tokens(plan, 0, lambda: None)
    tokenizer = _run_tokenizer(plan)
    texts = vocab.read_texts(plan.recipe, plan.data_paths)
    sep = token_cache.separator_id(tokenizer)
    b = data.Batches(tokens, np.arange(len(tokens.ids)), plan, 0)
    rows = np.array([5, 0, 700])
    batch = b.collate(rows, epoch=0)
    for j, i in enumerate(rows):
        doc = [*tokenizer.encode(texts[i], add_special_tokens=False).ids, sep][:64]  # the separator ends it
        n = len(doc)
        assert batch["input_ids"][j].tolist() == doc + [0] * (64 - n)
        assert batch["attention_mask"][j].tolist() == [1] * n + [0] * (64 - n)
        assert batch["labels"][j].tolist() == doc + [-100] * (64 - n)


# --------------------------------------------------------------------------- mplaunch prepare


def test_prepare_writes_then_says_cached(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prepare", "recipes/bert_tiny.yaml", f"logging.dir={tmp_path}"]
    assert cli.main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    (where,) = _token_dirs(cache)
    assert line.startswith(f"prepared {where}: 91795 tokens, 1200 documents, 0.19 MB (uint16), ")
    assert line.endswith(" s")
    started = time.perf_counter()
    assert cli.main(argv) == 0
    assert time.perf_counter() - started < 1.0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"cached {where}: 91795 tokens, 1200 documents")
    # The run finds what prepare wrote: it reads no text.
    tokens = data.load_tokens(_plan(tmp_path), 0, lambda: None)
    assert capsys.readouterr().out == ""
    assert tokens.ids.cache.directory == where


def test_prepare_with_a_recipe_tokenizer(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tmp_path / "tok"
    vocab._train_wordpiece(CORPUS.read_text().splitlines()[:200], tok)
    argv = [
        "prepare",
        "recipes/bert_tiny.yaml",
        f"logging.dir={tmp_path}",
        f"data.tokenizer={json.dumps(str(tok))}",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("prepared ")
    assert not (cache / "tokenizers").exists()  # nothing trained: the recipe brings its tokenizer
    plan = _plan(tmp_path, f"data.tokenizer={json.dumps(str(tok))}")
    tokens = data.load_tokens(plan, 0, lambda: None)
    assert capsys.readouterr().out == ""
    assert tokens.ids.cache.directory == _token_dirs(cache)[0]


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (
            "bert_tiny.yaml",
            ["data.kind=synthetic", "data.paths=[]"],
            "error: mplaunch prepare: data.kind is synthetic",
        ),
        ("bert_tiny.yaml", ["data.paths=[EMPTY]"], "error: data.paths: no "),
        (
            "bert_finetune_tiny.yaml",
            [],
            "error: mplaunch prepare: data.task sequence-classification tokenizes one",
        ),
    ],
)
def test_prepare_refuses_what_it_cannot_prepare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str, overrides: list[str], message: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    overrides = [o.replace("EMPTY", json.dumps(str(empty))) for o in overrides]
    assert cli.main(["prepare", f"recipes/{recipe}", f"logging.dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(message), err


def test_prepare_with_an_unwritable_cache_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tmp_path / "tok"
    vocab._train_wordpiece(CORPUS.read_text().splitlines()[:200], tok)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("MPLAUNCH_CACHE", str(blocked))
    argv = [
        "prepare",
        "recipes/bert_tiny.yaml",
        f"logging.dir={tmp_path}",
        f"data.tokenizer={json.dumps(str(tok))}",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write the token cache" in err and "MPLAUNCH_CACHE" in err


# --------------------------------------------------------------------------- who trains the tokenizer


def test_workers_only_read_the_tokenizer_the_launcher_placed(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.run import preflight

    plan = resolve(load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}"]), CPU)
    tok = RunDir.from_plan(plan).tokenizer / "tokenizer.json"
    # Without the launcher's step a worker refuses, naming the file, and trains nothing.
    trained: list[object] = []
    with monkeypatch.context() as m:
        m.setattr(vocab, "prepare", lambda *a: trained.append(a))
        with pytest.raises(
            ValueError, match=r"holds no tokenizer.json: the launcher puts the trained tokenizer"
        ):
            data.load_tokens(plan, 0, lambda: None)
    assert trained == []
    assert not tok.exists()
    preflight.prepare_run_dir(plan)  # what `mplaunch RECIPE` and the Slurm submit do before any worker
    assert tok.is_file()
    before = tok.stat().st_mtime_ns
    preflight.prepare_run_dir(plan)  # a resumed run keeps the tokenizer it trained with
    assert tok.stat().st_mtime_ns == before
    assert len(data.load_tokens(plan, 0, lambda: None).ids) > 1000
