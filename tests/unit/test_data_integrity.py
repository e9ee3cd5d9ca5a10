"""The data a run trained on: a resume compares the data files' content, not only their paths.

Each checkpoint's signature records every data file's size and sha256 (launcher.plan.resume);
a file edited between a run and its resume (lines shuffled, same path, same size) is refused
before any worker starts, naming it, unless data.accept_changed names the new content. The
digests are cached by (size, mtime_ns, ctime_ns, inode), so a big corpus is read once.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import UserError
from launcher.plan import digests, resume
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.files import read_yaml
from launcher.recipe.schema import to_dict, validate
from launcher.rundir.checkpoint import structure

CPU = Hardware(gpus=(), cpu_count=4)
ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "recipes" / "data" / "corpus.txt"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "_PINNED", {})  # a worker's pins, never a test's


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(CORPUS.read_bytes())
    return path


def _plan(corpus: Path, **data: Any) -> Plan:
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"name": "bert-mlm", "size": "tiny", "vocab_size": 512},
        "data": {"kind": "text", "paths": [str(corpus)], **data},
        "train": {"micro_batch_size": 4, "max_steps": 100},
        "launch": {"device": "cpu", "nproc_per_node": 2},
        "precision": {"dtype": "fp32"},
    }
    return resolve(validate(raw, "test"), CPU)


def _manifest(plan: Plan, step: int = 40) -> dict[str, Any]:
    """What the checkpointer records about a plan (launcher.worker.checkpointer.Checkpointer._manifest)."""
    return {
        "step": step,
        "skipped_steps": 0,
        **structure(plan),
        "precision": plan.precision.dtype,
        resume.SIGNATURE_KEY: resume.signature(plan),
        "recipe": to_dict(plan.recipe),
    }


def _shuffle(path: Path) -> None:
    """The same lines in another order: same path, same size, other content."""
    lines = path.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    path.write_text("".join(lines))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the manifest


def test_the_signature_records_every_data_file_s_size_and_sha256(corpus: Path) -> None:
    assert resume.signature(_plan(corpus))[resume.CONTENT_KEY] == {
        str(corpus): {"bytes": corpus.stat().st_size, "sha256": _sha(corpus)}
    }


def test_a_directory_s_content_is_its_files_names_and_digests(tmp_path: Path) -> None:
    saved = tmp_path / "saved"  # data.kind hf-disk: a save_to_disk directory
    (saved / "train").mkdir(parents=True)
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (saved / "train" / "data-00000.arrow").write_bytes(b"\x00\x01" * 500)
    first = digests.data_content((str(saved),))[str(saved)]
    assert first["bytes"] == len('{"splits": ["train"]}') + 1000
    (saved / "train" / "data-00000.arrow").write_bytes(b"\x01\x00" * 500)
    assert digests.data_content((str(saved),))[str(saved)]["sha256"] != first["sha256"]


# --------------------------------------------------------------------------- refused, accepted


def test_a_shuffled_corpus_is_refused_naming_the_file_its_size_and_both_hashes(corpus: Path) -> None:
    plan = _plan(corpus)
    saved, before = _manifest(plan), _sha(corpus)
    _shuffle(corpus)
    after = _sha(corpus)
    with pytest.raises(UserError) as caught:
        resume.check(saved, _plan(corpus), "ckpt")
    (line,) = caught.value.lines
    token = digests.accept_token(digests.data_content((str(corpus),)))
    assert line == (
        f"cannot resume from ckpt: data file {corpus} changed since the checkpoint was written "
        f"(same size, {corpus.stat().st_size} bytes; sha256 {before[:12]} -> {after[:12]}) "
        "(hint: put the files back as they were, or accept their new content, whose samples and order differ "
        f"from the run's so far, from step 40 on with data.accept_changed={token} "
        "(nothing was started, nothing is overwritten))"
    )


def test_a_grown_file_is_named_with_both_sizes(corpus: Path) -> None:
    saved = _manifest(_plan(corpus))
    size = corpus.stat().st_size
    with corpus.open("a") as f:
        f.write("one more document\n")
    with pytest.raises(UserError, match=rf"size {size} -> {size + 18} bytes; sha256 "):
        resume.check(saved, _plan(corpus), "ckpt")


def test_the_override_accepts_exactly_the_content_it_names_and_says_so(corpus: Path) -> None:
    saved = _manifest(_plan(corpus))
    _shuffle(corpus)
    token = digests.accept_token(digests.data_content((str(corpus),)))
    lines = resume.check(saved, _plan(corpus, accept_changed=token), "ckpt")
    assert len(lines) == 1  # and no "applied on resume: data.accept_changed None -> ..."
    assert lines[0].startswith(
        f"accepted on resume (data.accept_changed={token}): data file {corpus} changed"
    )
    assert lines[0].endswith("; training continues from step 40 on the new content")
    corpus.write_text(
        corpus.read_text().replace("the", "a")
    )  # another edit: the same override no longer fits
    now = digests.accept_token(digests.data_content((str(corpus),)))
    with pytest.raises(
        UserError, match=f"data.accept_changed is {token} but the data's content is now {now}"
    ):
        resume.check(saved, _plan(corpus, accept_changed=token), "ckpt")


def test_an_override_for_unchanged_data_is_warned_as_having_no_effect(corpus: Path) -> None:
    plan = _plan(corpus)
    current = digests.accept_token(digests.data_content((str(corpus),)))
    assert (
        resume.check(_manifest(plan), _plan(corpus, accept_changed=current), "ckpt") == []
    )  # kept in recipe.yaml
    assert resume.check(_manifest(plan), _plan(corpus, accept_changed="content-0123456789ab"), "ckpt") == [
        "warning: data.accept_changed=content-0123456789ab has no effect: the data files are unchanged"
    ]


def test_the_override_is_strict_and_survives_yaml() -> None:
    with pytest.raises(UserError, match="accept_changed"):
        validate({"name": "t", "data": {"accept_changed": "yes"}}, "test")
    with pytest.raises(UserError, match="accept_changed"):
        validate(
            {"name": "t", "data": {"accept_changed": "0123456789ab"}}, "test"
        )  # the prefix keeps it a string
    value = read_yaml("content-123456789012")
    assert (
        validate({"name": "t", "data": {"accept_changed": value}}, "test").data.accept_changed
        == "content-123456789012"
    )


def test_an_older_checkpoint_without_hashes_resumes_and_says_so_once(corpus: Path) -> None:
    saved = _manifest(_plan(corpus))
    del saved[resume.SIGNATURE_KEY][resume.CONTENT_KEY]
    _shuffle(corpus)  # nothing to compare it with
    assert resume.check(saved, _plan(corpus), "ckpt") == [resume.NO_CONTENT]


def test_synthetic_data_has_no_content_to_compare() -> None:
    raw = {
        "name": "t",
        "model": {"name": "bert-mlm", "size": "tiny"},
        "train": {"micro_batch_size": 4},
        "launch": {"device": "cpu", "nproc_per_node": 1},
    }
    plan = resolve(validate(raw, "test"), CPU)
    assert resume.signature(plan)[resume.CONTENT_KEY] == {}
    saved = _manifest(plan)
    del saved[resume.SIGNATURE_KEY][resume.CONTENT_KEY]
    assert resume.check(saved, plan, "ckpt") == []


# --------------------------------------------------------------------------- the digest cache


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("the file was read again")

    monkeypatch.setattr(hashlib, "file_digest", refuse)


def test_a_digest_is_read_once_then_taken_from_the_cache(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 0)  # as if the corpus had been written long ago
    first = digests.data_content((str(corpus),))
    with monkeypatch.context() as m:
        _no_hashing(m)
        assert digests.data_content((str(corpus),)) == first


def test_the_cache_sees_an_edit_whose_size_and_mtime_were_restored(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "RACY_NS", 0)
    first = digests.data_content((str(corpus),))
    st = corpus.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    _shuffle(corpus)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: only ctime tells
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert (
        digests.data_content((str(corpus),))[str(corpus)]["sha256"]
        == _sha(corpus)
        != first[str(corpus)]["sha256"]
    )


def test_a_file_changed_moments_ago_is_not_cached(corpus: Path, tmp_path: Path) -> None:
    digests.data_content(
        (str(corpus),)
    )  # written by the fixture just now: a same-size rewrite could keep its times
    assert not (tmp_path / "cache" / digests.DIGESTS).exists() or not any(
        (tmp_path / "cache" / digests.DIGESTS).iterdir()
    )


def test_a_worker_s_pinned_content_is_what_its_checkpoints_record(corpus: Path) -> None:
    pinned = digests.pin_data_content((str(corpus),))
    _shuffle(corpus)  # edited while the run trains on what it read
    assert resume.signature(_plan(corpus))[resume.CONTENT_KEY] == pinned
