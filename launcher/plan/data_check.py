"""What `check` reads of the data files, so that a run does not fail in its workers on them.

Light side: plain file reads with the standard library, no tokenizer and no `datasets`. Each
problem is one line naming the recipe key, the file and (for a record) the line:

- a file that cannot be read, is not UTF-8 text, or holds no record (blank lines only);
- data.kind jsonl: a line that is no JSON object, or a record without a field the task reads
  (launcher.worker.examples and launcher.plan.vocab: data.text_field for masked-lm and causal-lm,
  data.text_field and data.label_field for sequence-classification, data.prompt_field and
  data.response_field for sft). Only the first `MAX_RECORDS` records of each file are parsed,
  so check stays fast on a large corpus; the workers read the rest.
- data.kind json (JSON lines) read to its end within `MAX_RECORDS`: a field no record has (Hugging
  Face datasets makes a column of every key any record has). data.kind csv: a field its header
  row lacks, or no row under the header. Their rows are not counted (datasets reads them).
- too little data for one global batch, by the workers' rule (launcher.worker.train.setup,
  launcher.worker.data.split and Batches): of N rows int(N * data.eval_fraction) are held out and the
  rest must fill train.global_batch_size at least once (evaluation needs no full batch). A
  per-record task, and masked-lm or causal-lm with data.pack false, has one row per record: the
  records of text and jsonl files are counted as the reader counts them (non-blank lines), and
  counting stops once there are enough. Packed rows are cut from the token stream, whose length
  is known only after tokenizing: the refusal then rests on an upper bound (`_token_bound`).

data.target, synthetic data and the other kinds (parquet, arrow, hf-disk) are left to the workers.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.plan import records
from launcher.recipe import tasks

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

MAX_RECORDS = 1000  # records parsed per file for the field check
CHECKED_KINDS = ("text", "jsonl", "json", "csv")
COUNTED_KINDS = ("text", "jsonl")  # a record is a non-blank line: counted exactly

# A problem: the recipe key it is about (None: the file's data.paths entry) and what is wrong.
Problem = tuple[str | None, str]


@dataclass
class Scan:
    """What was read of one text, jsonl or json file."""

    records_read: int = 0  # non-blank lines read (each one record to the workers)
    complete: bool = False  # read to its end: records_read is the file's number of records
    text_bytes: int = 0  # jsonl: UTF-8 bytes of the parsed records' data.text_field
    problem: Problem | None = None


def problems(
    recipe: Recipe,
    data_paths: Sequence[str],
    global_batch_size: int | None,
    trained_tokenizer: bool,
    *,
    task: str | None = None,
) -> list[str]:
    """The data files' problems that would stop the workers, one line each.

    Args:
        recipe: the validated recipe (its data.paths, as written, name the files in messages).
        data_paths: those files, resolved (Plan.data_paths); one that is not there is skipped
            (launcher.recipe.rules says so), and then the rows are not counted.
        global_batch_size: samples per optimizer step; None when the batch could not be sized (the
            rows are not counted then).
        trained_tokenizer: the workers tokenize with the tokenizer mplaunch trains on the data
            (no data.tokenizer and no model.hf tokenizer); the bound on packed rows holds for it.
        task: the plan's task (`ModelFacts.task`); None: as the recipe alone decides it (launcher.recipe.tasks).
    """
    d, task = recipe.data, task or tasks.resolve(recipe)
    if d.target is not None or d.kind not in CHECKED_KINDS:
        return []
    base = Path(recipe.source).parent if recipe.source else Path()
    shown = [str(base / p) for p in d.paths]
    fields = needed_fields(recipe, task)
    per_record = task in tasks.PER_RECORD or not d.pack
    wanted = (global_batch_size or 0) if per_record and d.kind in COUNTED_KINDS else 0
    found: list[str] = []
    scans: list[Scan] = []
    missing = not all(Path(p).is_file() for p in data_paths)
    for i, (name, path) in enumerate(zip(shown, data_paths, strict=True)):
        if not Path(path).is_file():
            continue
        if d.kind == "csv":
            problem = _csv(path, name, fields)
        else:
            counted = sum(s.records_read for s in scans)
            scans.append(scan(path, name, d.kind, fields, _enough(counted, d.eval_fraction, wanted)))
            problem = scans[-1].problem
        if problem is not None:
            found.append(f"{problem[0] or f'data.paths[{i}]'}: {problem[1]}")
    if found or missing or global_batch_size is None or d.kind not in COUNTED_KINDS:
        return found
    if per_record:
        return _too_few_records(recipe, shown, scans, global_batch_size, task)
    if trained_tokenizer:
        return _too_few_tokens(recipe, shown, data_paths, scans, global_batch_size, task == tasks.MASKED_LM)
    return []


MASK_TOKEN = "[MASK]"  # the token the workers' masking reads (launcher.run.token_cache.checked_tokenizer)


def mask_problem(tokenizer_dir: Path, key: str) -> str | None:
    """data.task masked-lm masks with [MASK]: the line when the tokenizer in `tokenizer_dir` has none.

    Read as the workers read it (tokenizer.json's vocabulary and added tokens, else vocab.txt or
    vocab.json), without the tokenizer libraries; None when it has one, or when only a SentencePiece
    model could say.

    Args:
        key: the recipe key that names the tokenizer (data.tokenizer, or model.hf for its own).
    """
    tokens = _token_strings(tokenizer_dir)
    if tokens is None or MASK_TOKEN in tokens:
        return None
    declared = _declared_mask(tokenizer_dir)
    other = f" (its mask token {declared!r} is not one mplaunch's masking reads)" if declared else ""
    return (
        f"{key}: data.task masked-lm masks tokens with {MASK_TOKEN}, and the tokenizer in {tokenizer_dir} "
        f"has none{other}; a causal LM trains with data.task=causal-lm"
    )


def _token_strings(directory: Path) -> set[str] | None:
    try:
        if (directory / "tokenizer.json").is_file():
            data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = data.get("model", {}).get("vocab", {})
            pieces = vocab if isinstance(vocab, dict) else [p[0] for p in vocab if isinstance(p, list) and p]
            return {str(t) for t in pieces} | {str(t.get("content")) for t in data.get("added_tokens", [])}
        if (directory / "vocab.txt").is_file():
            return set((directory / "vocab.txt").read_text(encoding="utf-8").splitlines())
        if (directory / "vocab.json").is_file():
            return set(json.loads((directory / "vocab.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError, TypeError):
        return None  # unreadable: the workers say why
    return None


def _declared_mask(directory: Path) -> str | None:
    """The mask token tokenizer_config.json or special_tokens_map.json names, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            token = json.loads((directory / name).read_text(encoding="utf-8")).get("mask_token")
        except (OSError, ValueError, AttributeError):
            continue
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            return token
    return None


def needed_fields(recipe: Recipe, task: str | None = None) -> list[tuple[str, str]]:
    """(recipe key, field) of each record field the workers read: launcher.worker.examples.load's fields
    for a per-record task, else launcher.plan.vocab.text_fields (the tokenizer and the token cache).

    Args:
        task: the plan's task; None: as the recipe alone decides it."""
    d, task = recipe.data, task or tasks.resolve(recipe)
    if task == tasks.SEQUENCE_CLASSIFICATION:
        keys: tuple[str, ...] = ("text_field", "label_field")
    elif task == tasks.SFT or d.task == "sft":
        keys = ("prompt_field", "response_field")
    else:
        keys = ("text_field",)
    return [(f"data.{k}", getattr(d, k)) for k in keys]


def _enough(counted: int, eval_fraction: float, global_batch_size: int) -> Callable[[int], bool]:
    """Whether the records so far (`counted` before this file, n in it) fill one global batch."""
    return lambda n: counted + n - held_out(counted + n, eval_fraction) >= global_batch_size


def scan(
    path: str, name: str, kind: str, fields: list[tuple[str, str]], enough: Callable[[int], bool]
) -> Scan:
    """Read one text, jsonl or json file as the workers do (launcher.plan.records): its first
    MAX_RECORDS records with their fields, then on, only counting, until `enough(records read)`
    or the end of the file.

    Args:
        path: the file, resolved.
        name: the file as messages show it.
        kind: data.kind.
        fields: (recipe key, field) of each field every record needs (`needed_fields`).
        enough: whether so many records are enough for the caller's count.
    """
    read = Scan()
    keys: set[str] = set()  # json: every key of the records, the columns datasets would make
    objects = True  # json: every line is one object (JSON lines, not one JSON document)
    try:
        for n, line in records._lines(path):  # the reader's own rule for which lines are records
            read.records_read += 1
            if kind == "jsonl" and read.records_read <= MAX_RECORDS:
                record = _record(line)
                read.problem = _record_problem(record, name, n, fields)
                if read.problem is not None:
                    return read
                read.text_bytes += _text_bytes(record, fields)
            elif kind == "json" and read.records_read <= MAX_RECORDS:
                record = _record(line)
                objects = objects and isinstance(record, dict)
                keys |= set(record) if isinstance(record, dict) else set()
            if read.records_read >= MAX_RECORDS and enough(read.records_read):
                return read
        read.complete = True
    except OSError as exc:
        read.problem = (None, f"cannot read {name}: {exc.strerror or exc}")
        return read
    except ValueError as exc:  # records._lines: not UTF-8 (its message starts with the resolved path)
        read.problem = (None, f"{name}: {str(exc).removeprefix(f'{path}: ')}")
        return read
    if read.records_read == 0:
        read.problem = (None, _no_records(path, name))
    elif kind == "json" and objects:
        missing = [(key, field) for key, field in fields if field not in keys]
        if missing:
            key, field = missing[0]
            read.problem = (
                key,
                f"no record of {name} has a key {field!r} (their keys: {_names(sorted(keys))})",
            )
    return read


def _record(line: str) -> Any:
    """A line's JSON value, or the ValueError that says why it has none."""
    try:
        return json.loads(line)
    except ValueError as exc:
        return exc


def _record_problem(record: Any, name: str, n: int, fields: list[tuple[str, str]]) -> Problem | None:
    """A jsonl record the workers would refuse (launcher.plan.records._jsonl)."""
    if isinstance(record, ValueError):
        return None, f"{name} line {n} is not valid JSON ({record})"
    if not isinstance(record, dict):
        return None, f"{name} line {n} is not a JSON object (it is a {type(record).__name__})"
    for key, field in fields:
        if field not in record:
            return key, f"{name} line {n} has no key {field!r} (its keys: {_names(record)})"
    return None


def _text_bytes(record: dict[str, Any], fields: list[tuple[str, str]]) -> int:
    """UTF-8 bytes of the text the workers tokenize from this record (str of data.text_field's value)."""
    key, field = fields[0]
    return len(str(record[field]).encode("utf-8")) if key == "data.text_field" else 0


def _no_records(path: str, name: str) -> str:
    return f"{name} holds no records ({'it is empty' if os.path.getsize(path) == 0 else 'blank lines only'})"


def _csv(path: str, name: str, fields: list[tuple[str, str]]) -> Problem | None:
    """A csv file without a needed column in its header row, or without a row under it.

    pandas (which datasets reads csv with) takes the first non-blank row as the header and
    renames a repeated column name "name.1", "name.2"; so does this. A file that is not UTF-8,
    or not csv to Python's reader, is left to the workers.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = (row for row in csv.reader(f) if any(cell.strip() for cell in row))
            header, first = next(rows, None), next(rows, None)
    except OSError as exc:
        return None, f"cannot read {name}: {exc.strerror or exc}"
    except (ValueError, csv.Error):
        return None
    if header is None:
        return None, _no_records(path, name)
    columns = _mangled(header)
    for key, field in fields:
        if field not in columns:
            return key, f"{name} has no column {field!r} (its header: {_names(columns)})"
    return (None, f"{name} holds no records (a header row only)") if first is None else None


def _mangled(header: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for cell in header:
        n = seen.get(cell, 0)
        seen[cell] = n + 1
        out.append(f"{cell}.{n}" if n else cell)
    return out


def held_out(num_rows: int, eval_fraction: float) -> int:
    """The evaluation rows of `num_rows` (data.eval_fraction): the plan's count and launcher.worker.data.split's."""
    return int(num_rows * eval_fraction)


def _too_few_records(
    recipe: Recipe, shown: list[str], scans: list[Scan], global_batch_size: int, task: str
) -> list[str]:
    if not all(s.complete for s in scans):
        return []  # counting stopped because there are enough
    num = sum(s.records_read for s in scans)
    rows = "" if task in tasks.PER_RECORD else ", one per row (data.pack false)"
    return _refusal(
        recipe, f"{_files(shown)} {_verb(shown, 'holds')} {num} records{rows}", num, global_batch_size
    )


def _token_bound(recipe: Recipe, data_paths: Sequence[str], scans: list[Scan]) -> int | None:
    """At least as many tokens as the workers' packed stream will hold, or None when unknown.

    The stream (launcher.run.token_cache) is each record's text tokenized without special tokens,
    plus one separator after each. The tokenizers mplaunch trains (launcher.plan.vocab) never make
    more tokens of a text than it has UTF-8 bytes: byte-level BPE's tokens are one byte or more,
    WordPiece's one character or more of the text BertNormalizer leaves (NFD with the accents
    removed, lowercased), which has no more characters than the text has bytes. A text file's
    record is a stripped non-blank line, so a file of S bytes gives at most S + 1 tokens (each
    separator takes its line end's place; the last line may have none). A jsonl file is bounded
    only when every record was parsed: their texts' bytes plus one separator each. A tokenizer
    from data.tokenizer or model.hf is not bounded so (a normalizer may lengthen the text).
    """
    if recipe.data.kind == "text":
        return sum(os.path.getsize(p) + 1 for p in data_paths)
    if all(s.complete and s.records_read <= MAX_RECORDS for s in scans):
        return sum(s.text_bytes + s.records_read for s in scans)
    return None


def _too_few_tokens(
    recipe: Recipe,
    shown: list[str],
    data_paths: Sequence[str],
    scans: list[Scan],
    global_batch_size: int,
    masked: bool,
) -> list[str]:
    bound = _token_bound(recipe, data_paths, scans)
    seq_len = recipe.data.seq_len
    body = (
        seq_len - 2 if masked else seq_len
    )  # launcher.worker.data.StreamRows: masked-lm rows add [CLS], [SEP]
    if bound is None or body <= 0:
        return []
    rows = bound // body
    what = f"data.seq_len {seq_len} less [CLS] and [SEP]" if masked else f"data.seq_len {seq_len}"
    where = (
        f"{_files(shown)} {_verb(shown, 'tokenizes')} to at most {bound} tokens (one per byte of text and "
        f"a separator per record), at most {rows} packed rows of {body} tokens ({what})"
    )
    return _refusal(recipe, where, rows, global_batch_size)


def _refusal(recipe: Recipe, where: str, num_rows: int, global_batch_size: int) -> list[str]:
    """One line when the training rows of `num_rows` cannot fill one global batch, else none."""
    f = recipe.data.eval_fraction
    train = num_rows - held_out(num_rows, f)
    if train >= global_batch_size:
        return []
    held = f", {train} for training after data.eval_fraction {f:g} holds out {num_rows - train}" if f else ""
    fixes = "lower train.global_batch_size or add data"
    if num_rows >= global_batch_size:  # only the held-out rows are missing
        fixes = "lower train.global_batch_size or data.eval_fraction, or add data"
    return [
        f"train.global_batch_size: {where}{held}: fewer than one global batch of {global_batch_size}; {fixes}"
    ]


def _files(shown: list[str]) -> str:
    return shown[0] if len(shown) == 1 else f"the {len(shown)} files of data.paths"


def _verb(shown: list[str], verb: str) -> str:
    return verb if len(shown) == 1 else verb.removesuffix("s")


def _names(columns: Iterable[Any]) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names) if names else "none"
