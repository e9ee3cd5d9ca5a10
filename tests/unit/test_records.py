"""Every data.kind reads into the same records (launcher.plan.records), and the light side stays light."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.errors import UserError
from launcher.plan import records
from launcher.recipe.schema import Recipe, validate
from tests.conftest import ROOT

datasets = pytest.importorskip("datasets")

# Two files of rows, with a column no caller asks for and text a CSV must quote.
FILES = (
    {"text": ["first, with a comma", 'a "quoted" one'], "label": [0, 1], "extra": ["x", "y"]},
    {"text": ["third"], "label": [2], "extra": ["z"]},
)
EXPECTED = [
    {"text": "first, with a comma", "label": 0},
    {"text": 'a "quoted" one', "label": 1},
    {"text": "third", "label": 2},
]


def _recipe(kind: str, paths: list[Path], **data: Any) -> Recipe:
    raw: dict[str, Any] = {
        "name": "t",
        "model": {"name": None, "target": "pkg.mod:build"},  # a target may learn any task
        "data": {"kind": kind, "paths": [str(p) for p in paths], **data},
        "train": {"micro_batch_size": 4},
    }
    return validate(raw, "test")


def _rows(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _jsonl(path: Path, columns: dict[str, list[Any]]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in _rows(columns)) + "\n\n")  # a blank line is no record


def _csv(path: Path, columns: dict[str, list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(_rows(columns))


def _parquet(path: Path, columns: dict[str, list[Any]]) -> None:
    datasets.Dataset.from_dict(columns).to_parquet(str(path))


def _arrow(path: Path, columns: dict[str, list[Any]]) -> None:
    # A plain Arrow stream file: the one save_to_disk writes for a single shard.
    saved = path.with_suffix(".saved")
    datasets.Dataset.from_dict(columns).save_to_disk(str(saved))
    (shard,) = saved.glob("data-*.arrow")
    shard.rename(path)


def _hf_disk(path: Path, columns: dict[str, list[Any]]) -> None:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))


WRITERS: dict[str, tuple[str, Callable[[Path, dict[str, list[Any]]], None]]] = {
    "jsonl": (".jsonl", _jsonl),
    "json": (".json", _jsonl),  # JSON lines, as datasets' json builder reads them
    "csv": (".csv", _csv),
    "parquet": (".parquet", _parquet),
    "arrow": (".arrow", _arrow),
    "hf-disk": ("", _hf_disk),
}


def _write(tmp_path: Path, kind: str, files: tuple[dict[str, list[Any]], ...] = FILES) -> list[Path]:
    suffix, writer = WRITERS[kind]
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = [tmp_path / f"part{i}{suffix}" for i in range(len(files))]
    for path, columns in zip(paths, files, strict=True):
        writer(path, columns)
    return paths


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_kind_reads_the_same_records_with_just_the_fields_asked(tmp_path: Path, kind: str) -> None:
    paths = _write(tmp_path, kind)
    found = records.read_records(_recipe(kind, paths), map(str, paths), ("text", "label"))
    assert found == EXPECTED
    assert all(type(r["label"]) is int for r in found)  # labels stay numbers, as the classifier needs
    assert records.read_records(_recipe(kind, paths), map(str, paths), ("extra",)) == [
        {"extra": e} for e in ("x", "y", "z")
    ]


def test_text_lines_are_records_of_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("  first line \n\n   \nsecond line\n")
    recipe = _recipe("text", [path], text_field="body")
    found = records.read_records(recipe, [str(path)], ("body",))
    assert found == [{"body": "first line"}, {"body": "second line"}]
    with pytest.raises(ValueError, match=r"corpus.txt: data.kind text has one field per line .* no 'label' "):
        records.read_records(recipe, [str(path)], ("body", "label"))


def test_a_dataset_dict_gives_its_train_split(tmp_path: Path) -> None:
    splits = {"train": FILES[0], "validation": FILES[1]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dd")
    )
    dd = tmp_path / "dd"
    found = records.read_records(_recipe("hf-disk", [dd]), [str(dd)], ("text", "label"))
    assert found == EXPECTED[:2]


def test_a_dataset_dict_without_a_train_split_names_the_splits_it_has(tmp_path: Path) -> None:
    splits = {"validation": FILES[0], "test": FILES[1]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dd")
    )
    expected = r"dd: a DatasetDict without a 'train' split; it has 'validation', 'test' "
    with pytest.raises(ValueError, match=expected):
        records.read_records(_recipe("hf-disk", [tmp_path / "dd"]), [str(tmp_path / "dd")], ("text",))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_missing_field_names_the_file_the_field_its_key_and_the_columns(tmp_path: Path, kind: str) -> None:
    paths = _write(tmp_path, kind)
    recipe = _recipe(kind, paths, label_field="category")
    with pytest.raises(ValueError) as caught:
        records.read_records(recipe, map(str, paths), ("text", "category"))
    message = str(caught.value)
    where = f"{paths[0]}:1" if kind == "jsonl" else str(paths[0])
    assert message.startswith(f"{where}: ")
    assert "'category' (data.label_field)" in message
    assert message.endswith("'text', 'label', 'extra'")
    assert "\n" not in message


def test_the_jsonl_message_is_the_one_the_tokenizer_always_gave(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"other": 1}\n')
    expected = r"bad.jsonl:2: record has no field 'text' \(data.text_field\); it has 'other'$"
    with pytest.raises(ValueError, match=expected):
        records.read_records(_recipe("jsonl", [path]), [str(path)], ("text",))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"text": "fine"}\n{"text": \n', "not valid JSON"),
        ('{"text": "fine"}\n["text"]\n', "expected a JSON object, got list"),
    ],
)
def test_a_bad_jsonl_line_names_file_and_line(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^{path}:2: {reason}"):
        records.read_records(_recipe("jsonl", [path]), [str(path)], ("text",))


@pytest.mark.parametrize("kind", ["csv", "json", "parquet", "arrow"])
def test_a_malformed_file_is_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"broken.{kind}"
    path.write_text('text,label\n"never closed,1\n' if kind == "csv" else "this is not the format\n")
    with pytest.raises(ValueError, match=rf"^{path}: cannot be read as data.kind {kind}: ") as caught:
        records.read_records(_recipe(kind, [path]), [str(path)], ("text",))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["text", "jsonl", "csv"])
def test_files_without_records_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"empty.{kind}"
    path.write_text("text\n" if kind == "csv" else "\n  \n")
    with pytest.raises(ValueError, match=rf"^no records found in {path}$"):
        records.read_records(_recipe(kind, [path]), [str(path)], ("text",))


# _recipe for a subprocess, which must not import this module (it imports datasets).
_RECIPE_CODE = """
def recipe(kind, paths):
    model = {"name": None, "target": "pkg.mod:build"}
    data = {"kind": kind, "paths": paths}
    return validate({"name": "t", "model": model, "data": data, "train": {"micro_batch_size": 4}}, "test")
"""


def test_light_kinds_never_import_datasets(tmp_path: Path) -> None:
    text, jsonl, table = tmp_path / "a.txt", tmp_path / "a.jsonl", tmp_path / "a.csv"
    text.write_text("one\n")
    jsonl.write_text('{"text": "two"}\n')
    _csv(table, FILES[0])
    code = f"""
import sys
from launcher.plan import records, vocab
from launcher.recipe.schema import validate
{_RECIPE_CODE}
print("datasets" in sys.modules)
for kind, path in (("text", {str(text)!r}), ("jsonl", {str(jsonl)!r})):
    records.read_records(recipe(kind, [path]), [path], ("text",))
    vocab.read_texts(recipe(kind, [path]), (path,))
print("datasets" in sys.modules)
records.read_records(recipe("csv", [{str(table)!r}]), [{str(table)!r}], ("text",))
print("datasets" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False", "True"]  # the last: the check can see an import


def test_datasets_writes_under_mplaunch_cache_and_shows_no_progress(tmp_path: Path) -> None:
    paths = {kind: _write(tmp_path / kind, kind) for kind in ("csv", "json", "parquet", "arrow", "hf-disk")}
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    code = f"""
from launcher.plan import records
from launcher.recipe.schema import validate
{_RECIPE_CODE}
for kind, paths in {json.dumps({k: [str(p) for p in v] for k, v in paths.items()})}.items():
    records.read_records(recipe(kind, paths), paths, ("text", "label"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), MPLAUNCH_CACHE=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == out.stderr == ""  # no progress bars, no log lines
    assert [p for p in home.rglob("*") if p.is_file()] == []
    assert any((cache / "datasets").rglob("*.arrow"))


def test_hash_paths_follows_every_file_of_an_hf_disk_directory(tmp_path: Path) -> None:
    def digest() -> str:
        key = hashlib.sha256()
        records.hash_paths(key, [str(tmp_path / "disk")])
        return key.hexdigest()

    _hf_disk(tmp_path / "disk", FILES[0])
    before = digest()
    assert digest() == before
    (shard,) = (tmp_path / "disk").glob("data-*.arrow")
    original = shard.read_bytes()
    assert b"first" in original
    shard.write_bytes(original.replace(b"first", b"First"))
    assert digest() != before
    shard.write_bytes(original)
    assert digest() == before
    (tmp_path / "disk" / "notes.txt").write_text("")
    changed = digest()
    (tmp_path / "disk" / "notes.txt").rename(tmp_path / "disk" / "other.txt")
    assert digest() != changed  # a file's name counts, not only its bytes


@pytest.mark.parametrize(
    ("task", "needs"),
    [("sequence-classification", "data.label_field"), ("sft", "data.prompt_field and data.response_field")],
)
def test_text_files_cannot_feed_a_per_record_task(tmp_path: Path, task: str, needs: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("a line\n")
    with pytest.raises(UserError) as caught:
        _recipe("text", [path], task=task)
    assert caught.value.lines == [
        f"test: data.kind: text has one field per line; {task} needs records with {needs}: "
        "use jsonl, json, csv, parquet, arrow or hf-disk"
    ]
    for kind in ("text", "jsonl"):
        lm = _recipe(kind, [path], task="causal-lm")
        assert lm.data.kind == kind
    assert _recipe("jsonl", [path], task=task).data.task == task
