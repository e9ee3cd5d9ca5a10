"""Records of the data files: what every data.kind reads into, and the one content hash of them.

- text: each non-empty line (stripped) is a record `{data.text_field: line}`.
- jsonl: each non-empty line is one JSON object, read with the standard library.
- json, csv, parquet, arrow: files read by Hugging Face `datasets.load_dataset(kind, ...)`.
- hf-disk: directories written by `Dataset.save_to_disk` (or a `DatasetDict`'s, whose
  "train" split is read), read by `datasets.load_from_disk`.

Every rank reads the records, so `datasets` keeps its arrow cache under MPLAUNCH_CACHE
(default ~/.cache/mplaunch) and shows no progress bars.

Light side: Hugging Face `datasets` is imported only when a kind needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

# The kinds Hugging Face datasets reads from files, by its own builder names.
DATASETS_KINDS = ("json", "csv", "parquet", "arrow")


def read_records(recipe: Recipe, data_paths: Iterable[str], fields: Iterable[str]) -> list[dict[str, Any]]:
    """Every record of the data files, in file order, holding just `fields`.

    Args:
        recipe: the validated recipe (data.kind says how to read; not synthetic).
        data_paths: its data files, resolved (kind hf-disk: save_to_disk directories).
        fields: the record fields to keep, such as (data.text_field,).

    Returns:
        One dict per record with exactly `fields` as keys, values as the file holds them.

    Raises:
        OSError: a path cannot be read.
        ValueError: a file is malformed, lacks a field, or no file holds a record; one line
            naming the file (and line, for jsonl).
    """
    kind, paths, wanted = recipe.data.kind, tuple(data_paths), tuple(dict.fromkeys(fields))
    assert kind != "synthetic", "synthetic data has no files to read"
    keys = _recipe_keys(recipe)
    found: list[dict[str, Any]] = []
    for path in paths:
        if kind == "text":
            found += _text(path, wanted, recipe.data.text_field, keys)
        elif kind == "jsonl":
            found += _jsonl(path, wanted, keys)
        else:
            found += _with_datasets(recipe, path, wanted, keys)
    if not found:
        raise ValueError(f"no records found in {', '.join(paths)}")
    return found


def hash_paths(key: hashlib._Hash, paths: Iterable[str]) -> None:
    """Feed the content of each data path into `key`: a file's bytes, or every file under a
    directory (kind hf-disk) with its relative name, in sorted order."""
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            key.update(str(file.relative_to(path)).encode() + b"\0" if path.is_dir() else b"")
            key.update(file.read_bytes())
            key.update(b"\0")


def _recipe_keys(recipe: Recipe) -> dict[str, str]:
    """Field name -> the recipe key that named it (the first, when two keys name one field)."""
    d, keys = recipe.data, dict[str, str]()
    for key in ("text_field", "label_field", "prompt_field", "response_field"):
        keys.setdefault(getattr(d, key), f"data.{key}")
    return keys


def _text(path: str, fields: tuple[str, ...], text_field: str, keys: dict[str, str]) -> list[dict[str, Any]]:
    others = [f for f in fields if f != text_field]
    if others:
        raise ValueError(
            f"{path}: data.kind text has one field per line ({text_field!r}, data.text_field), no "
            f"{others[0]!r} ({keys.get(others[0], 'requested')}); "
            "use jsonl, json, csv, parquet, arrow or hf-disk"
        )
    return [{text_field: line} for _, line in _lines(path)]


def _jsonl(path: str, fields: tuple[str, ...], keys: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for n, line in _lines(path):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        for field in fields:
            if field not in record:
                raise ValueError(
                    f"{path}:{n}: record has no field {field!r} ({keys.get(field, 'requested')}); "
                    f"it has {_names(record)}"
                )
        found.append({f: record[f] for f in fields})
    return found


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of each non-empty line of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.strip()
        except UnicodeDecodeError as exc:  # decoded by the block: the line number is unknown
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _with_datasets(
    recipe: Recipe, path: str, fields: tuple[str, ...], keys: dict[str, str]
) -> list[dict[str, Any]]:
    """The records of one file (or save_to_disk directory) as Hugging Face datasets reads them."""
    import datasets
    import pyarrow
    from datasets.exceptions import DatasetsError

    kind = recipe.data.kind
    cache = Path(os.environ.get("MPLAUNCH_CACHE", Path.home() / ".cache" / "mplaunch")) / "datasets"
    with _quiet(datasets):
        try:
            if kind == "hf-disk":
                loaded = datasets.load_from_disk(path)
            else:
                assert kind in DATASETS_KINDS, kind
                loaded = datasets.load_dataset(kind, data_files=[path], split="train", cache_dir=str(cache))
        except (DatasetsError, pyarrow.ArrowException, ValueError) as exc:
            if isinstance(exc, OSError):
                raise
            if "corresponds to no data" in str(exc):  # datasets' word for a file without rows
                return []
            # A build error's own message is generic; the parser's error is its cause.
            reason = str(exc.__cause__ or exc).strip().splitlines()[0]
            raise ValueError(f"{path}: cannot be read as data.kind {kind}: {reason}") from None
        table = _train_split(loaded, path)
        columns = list(table.column_names)
        for field in fields:
            if field not in columns:
                raise ValueError(
                    f"{path}: no field {field!r} ({keys.get(field, 'requested')}); it has {_names(columns)}"
                )
        rows: list[dict[str, Any]] = table.select_columns(list(fields)).to_list()
    return rows


def _train_split(loaded: Any, path: str) -> Any:
    """The Dataset that was read, or the "train" split of a save_to_disk DatasetDict."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"{path}: a DatasetDict without a 'train' split; it has {_names(loaded)} "
                "(save the split to train on as 'train', or save that Dataset alone)"
            )
        loaded = loaded["train"]
    assert isinstance(loaded, datasets.Dataset), type(loaded)
    return loaded


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars or log lines from datasets (every rank reads); errors are raised, not logged."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _names(columns: Iterable[str]) -> str:
    names = [repr(c) for c in columns]
    return ", ".join(names) if names else "no fields"
