"""The token cache is verified: a CRC-32 of each file is written with it and checked by rank 0 at
open, once per start; a file edited in place (same size) is rebuilt, never read.

The run-level proof (a real run after the edit trains on the corpus's tokens) is in
tests/e2e/test_data_integrity.py.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.plan import digests, vocab
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.run import token_cache
from launcher.rundir import checkpoint
from launcher.worker import data

ROOT = Path(__file__).resolve().parents[2]
CPU = Hardware(cpu_count=2)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MPLAUNCH_CACHE", str(root))
    monkeypatch.setattr(digests, "_PINNED", {})  # load_tokens pins the data's content for the process
    return root


def _plan(tmp_path: Path):
    plan = resolve(load(ROOT / "recipes" / "bert_tiny.yaml", [f"logging.dir={tmp_path}"]), CPU)
    token_cache.place_tokenizer(plan)
    return plan


def _rows(tokens: data.Tokens) -> torch.Tensor:
    return tokens.ids.take(np.arange(len(tokens.ids)))[0]


def _where(cache: Path) -> Path:
    (where,) = [p for p in (cache / "tokens").iterdir() if not p.name.startswith(".")]
    return where


def _flip(path: Path, at: int = 64) -> None:
    """Edit the file in place, its size unchanged: two bytes swapped with two others."""
    with open(path, "r+b") as f:
        f.seek(at)
        two = f.read(4)
        f.seek(at)
        f.write(two[2:] + two[:2] if two[:2] != two[2:] else bytes(b ^ 1 for b in two))


def test_meta_json_holds_each_file_s_crc32(tmp_path: Path, cache: Path) -> None:
    data.load_tokens(_plan(tmp_path), 0, lambda: None)
    where = _where(cache)
    meta = json.loads((where / "meta.json").read_text())
    assert meta["format"] == token_cache.FORMAT_VERSION == 2
    assert meta["checksum"] == "crc32"
    for name in ("tokens", "offsets"):
        assert meta[f"{name}_crc32"] == f"{zlib.crc32((where / f'{name}.bin').read_bytes()):08x}"


@pytest.mark.parametrize("name", ["tokens.bin", "offsets.bin"])
def test_a_file_edited_in_place_is_rebuilt_by_rank_0_with_one_line(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    plan = _plan(tmp_path)
    first = _rows(data.load_tokens(plan, 0, lambda: None))
    where = _where(cache)
    size = (where / name).stat().st_size
    _flip(where / name, at=size // 2 // 8 * 8)
    assert (where / name).stat().st_size == size
    capsys.readouterr()
    again = data.load_tokens(plan, 0, lambda: None)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"mplaunch: warning: {where / name}: not the content its meta.json's CRC-32 says "
        "(changed since it was written); rebuilding the token cache from the data files"
    )
    assert out[1].startswith("mplaunch: tokenized 1200 documents")
    assert len(out) == 2
    assert torch.equal(_rows(again), first)
    assert token_cache.find(where, verify=True) is not None  # rewritten whole, checksums and all
    assert not [p for p in (cache / "tokens").iterdir() if p.name.startswith(".")]  # the failed copy is gone


def test_an_edit_is_named_when_a_rebuild_is_not_asked_for(tmp_path: Path, cache: Path) -> None:
    data.load_tokens(_plan(tmp_path), 0, lambda: None)
    where = _where(cache)
    _flip(where / "tokens.bin")
    with pytest.raises(
        token_cache.Damaged, match=rf"tokens.bin: not the content .*; delete {where} and run again"
    ):
        token_cache.find(where, verify=True)
    assert token_cache.find(where) is not None  # the sizes alone cannot tell


def test_only_rank_0_reads_the_cache_whole_to_check_it(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path)
    data.load_tokens(plan, 0, lambda: None)  # writes it
    checked: list[str] = []
    crc = checkpoint.checksum
    monkeypatch.setattr(checkpoint, "checksum", lambda path: checked.append(Path(path).name) or crc(path))
    data.load_tokens(plan, 1, lambda: None)
    assert checked == []
    data.load_tokens(plan, 0, lambda: None)
    assert checked == ["tokens.bin", "offsets.bin"]


def test_mplaunch_prepare_rebuilds_an_edited_cache(tmp_path: Path, cache: Path) -> None:
    # `mplaunch prepare` and the worker share token_cache.ensure, which checks by default.
    recipe = load(ROOT / "recipes" / "bert_tiny.yaml")
    tok = vocab.prepare(recipe, (str(ROOT / "recipes" / "data" / "corpus.txt"),))
    paths = (str(ROOT / "recipes" / "data" / "corpus.txt"),)
    found, written = token_cache.ensure(recipe, paths, tok)
    assert written
    _flip(found.tokens_path)
    again, written = token_cache.ensure(recipe, paths, tok)
    assert written
    assert again.directory == found.directory
    assert token_cache.find(again.directory, verify=True) is not None
