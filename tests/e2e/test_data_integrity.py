"""The data a run trained on, in real runs on 2 CPU ranks.

- The corpus edited between a run and its resume (lines shuffled: same path, same size): the
  resume is refused before any worker starts, naming the file, its size and both sha256s, and
  goes on only with data.accept_changed naming the new content, saying what it accepted.
- The token cache edited in place (same size): the next run finds the checksum written with it
  wrong, rebuilds it (one line), and trains exactly as the run before the edit did.

The rules on plans and manifests alone: tests/unit/test_data_integrity.py; the cache's checks on
one rank: tests/worker/test_data_integrity.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from tests.runs import FAST, ROOT, explain, losses, mplaunch, write_recipe

pytestmark = pytest.mark.slow

CORPUS = ROOT / "recipes" / "data" / "corpus.txt"


def _recipe(tmp: Path, name: str, corpus: Path, **train: int) -> Path:
    layer = {
        "data": {"kind": "text", "paths": [str(corpus)]},
        "train": {"max_steps": 4, **train},
        "checkpoint": {"every_steps": 2, "keep": 3},
    }
    return write_recipe(tmp, name, FAST, layer)


def _manifest(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())


def test_an_edited_corpus_is_refused_on_resume_and_taken_only_when_accepted_by_name(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CORPUS.read_bytes())
    env = {"MPLAUNCH_CACHE": str(tmp_path / "cache")}
    first = mplaunch(str(_recipe(tmp_path, "run", corpus)), env=env, timeout=600)
    assert first.returncode == 0, explain(first)
    run_dir = tmp_path / "runs" / "run"
    before = hashlib.sha256(corpus.read_bytes()).hexdigest()
    content = _manifest(run_dir, 4)["resume_signature"]["data content"]
    assert content == {str(corpus): {"bytes": corpus.stat().st_size, "sha256": before}}

    lines = corpus.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    corpus.write_text("".join(lines))
    after = hashlib.sha256(corpus.read_bytes()).hexdigest()
    metrics = (run_dir / "metrics.jsonl").read_text()
    refused = mplaunch("--resume", str(run_dir), "train.max_steps=6", env=env, timeout=600)
    assert refused.returncode == 2, explain(refused)
    assert "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        f"error: cannot resume from {run_dir / 'checkpoints' / 'step-00000004'}: data file {corpus} changed "
        f"since the checkpoint was written (same size, {corpus.stat().st_size} bytes; "
        f"sha256 {before[:12]} -> {after[:12]})"
    ), explain(refused)
    token = re.search(r"data\.accept_changed=(content-[0-9a-f]{12})", line)
    assert token is not None, line
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # no worker started
    assert not (run_dir / "checkpoints" / "step-00000006").exists()

    accepted = mplaunch(
        "--resume", str(run_dir), "train.max_steps=6", f"data.accept_changed={token[1]}", env=env, timeout=600
    )
    assert accepted.returncode == 0, explain(accepted)
    assert (
        f"mplaunch: accepted on resume (data.accept_changed={token[1]}): data file {corpus} changed"
        in accepted.stderr
    ), explain(accepted)
    assert "resuming from step 4" in accepted.stdout, explain(accepted)
    assert _manifest(run_dir, 6)["resume_signature"]["data content"][str(corpus)]["sha256"] == after
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_a_token_cache_edited_in_place_is_rebuilt_and_the_run_trains_as_before(tmp_path: Path) -> None:
    env = {"MPLAUNCH_CACHE": str(tmp_path / "cache")}
    first = mplaunch(str(_recipe(tmp_path, "a", CORPUS, max_steps=3)), env=env, timeout=600)
    assert first.returncode == 0, explain(first)
    (where,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.startswith(".")]
    meta = json.loads((where / "meta.json").read_text())
    stream = np.fromfile(where / "tokens.bin", dtype=meta["dtype"])
    np.roll(stream, 1).tofile(where / "tokens.bin")  # every token one place on: same size, other rows

    second = mplaunch(str(_recipe(tmp_path, "b", CORPUS, max_steps=3)), env=env, timeout=600)
    assert second.returncode == 0, explain(second)
    assert (
        f"mplaunch: warning: {where / 'tokens.bin'}: not the content its meta.json's CRC-32 says "
        "(changed since it was written); rebuilding the token cache from the data files"
    ) in second.stdout, explain(second)
    assert losses(tmp_path / "runs" / "b") == losses(tmp_path / "runs" / "a")
    assert np.array_equal(np.fromfile(where / "tokens.bin", dtype=meta["dtype"]), stream)
