"""`check` reads the data files: missing fields, bad lines, empty files and too little data are one line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import cli
from launcher.plan import data_check, records
from launcher.plan.hardware import Hardware
from launcher.recipe.schema import load

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
FINETUNE = RECIPES / "bert_finetune_tiny.yaml"  # sequence-classification on data/topics.jsonl (2000 records)
SFT = RECIPES / "llama_sft_tiny.yaml"  # sft on data/questions.jsonl (2000 records)
BERT = RECIPES / "bert_tiny.yaml"  # packed masked-lm on data/corpus.txt (1200 lines), data.seq_len 64
TOPICS = RECIPES / "data" / "topics.jsonl"


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch, tiny_models: Path) -> None:
    """A 2-CPU machine (the tiny recipes run 2 CPU processes), and the model directories they name."""
    monkeypatch.setattr(Hardware, "probe", classmethod(lambda cls: Hardware(cpu_count=2)))


def check(capsys: pytest.CaptureFixture[str], recipe: Path, *overrides: str) -> tuple[int, list[str]]:
    code = cli.main(["check", str(recipe), *overrides])
    return code, capsys.readouterr().err.splitlines()


def paths(*files: Path) -> str:
    return f"data.paths={json.dumps([str(f) for f in files])}"


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- fields and lines


def test_a_label_field_no_record_has_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, FINETUNE, "data.label_field=topic")
    assert code == 2
    assert err == [f"error: data.label_field: {TOPICS} line 1 has no key 'topic' (its keys: text, label)"]


def test_sft_needs_the_prompt_and_response_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, SFT, "data.response_field=answer")
    assert code == 2
    assert err == [
        f"error: data.response_field: {RECIPES / 'data' / 'questions.jsonl'} line 1 has no key 'answer' "
        "(its keys: prompt, response)"
    ]


def test_a_record_missing_the_text_field_is_named_by_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f = jsonl(tmp_path / "c.jsonl", [{"text": "a b c"}] * 40 + [{"body": "d e"}] + [{"text": "x"}] * 10)
    code, err = check(capsys, BERT, "data.kind=jsonl", paths(f))
    assert code == 2
    assert err == [f"error: data.text_field: {f} line 41 has no key 'text' (its keys: body)"]


def test_classification_also_needs_the_text_field(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, FINETUNE, "data.text_field=sentence")
    assert code == 2
    assert err == [f"error: data.text_field: {TOPICS} line 1 has no key 'sentence' (its keys: text, label)"]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("[1, 2]", "line 3 is not a JSON object (it is a list)"),
        ('"just text"', "line 3 is not a JSON object (it is a str)"),
        ("{'text': 1}", "line 3 is not valid JSON (Expecting property name enclosed in double quotes"),
    ],
)
def test_a_jsonl_line_that_is_no_object_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, line: str, says: str
) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a", "label": 0}\n\n' + line + "\n")  # the blank line is skipped, but counted
    code, err = check(capsys, FINETUNE, paths(f))
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: data.paths[0]: {f} {says}")


@pytest.mark.parametrize(("body", "says"), [("", "it is empty"), ("\n  \n\t\n", "blank lines only")])
def test_a_file_without_records_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, body: str, says: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(body)
    code, err = check(capsys, BERT, paths(RECIPES / "data" / "corpus.txt", empty))
    assert code == 2
    assert err == [f"error: data.paths[1]: {empty} holds no records ({says})"]


def test_a_file_that_is_not_utf8_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    code, err = check(capsys, BERT, paths(f))
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: data.paths[0]: {f}: not UTF-8 text (")


def test_an_unreadable_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = jsonl(tmp_path / "secret.jsonl", [{"text": "a", "label": 0}] * 40)
    f.chmod(0)
    if os.access(f, os.R_OK):  # root reads every file: fail the open as it fails for a user
        real_open = open

        def refuse(file: str, *args: object, **kwargs: object) -> object:
            if Path(file) == f:
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr("builtins.open", refuse)
    try:
        code, err = check(capsys, FINETUNE, paths(f))
    finally:
        monkeypatch.undo()
        f.chmod(0o600)
    assert code == 2
    assert err == [f"error: data.paths[0]: cannot read {f}: Permission denied"]


def test_a_csv_header_without_the_field_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f = tmp_path / "t.csv"
    f.write_text('\ufeffsentence,label\n"a, b",1\nc,0\n')
    code, err = check(capsys, FINETUNE, "data.kind=csv", paths(f))
    assert code == 2
    assert err == [f"error: data.text_field: {f} has no column 'text' (its header: sentence, label)"]
    assert check(capsys, FINETUNE, "data.kind=csv", "data.text_field=sentence", paths(f))[0] == 0


def test_a_json_lines_file_where_no_record_has_the_field_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f = jsonl(tmp_path / "t.json", [{"text": "a", "label": 0}, {"text": "b"}])
    code, err = check(capsys, FINETUNE, "data.kind=json", "data.label_field=topic", paths(f))
    assert code == 2
    assert err == [f"error: data.label_field: no record of {f} has a key 'topic' (their keys: label, text)"]
    # datasets makes a column of a key any record has: a record without it is no certain failure here.
    assert check(capsys, FINETUNE, "data.kind=json", paths(f))[0] == 0


# --------------------------------------------------------------------------- too little data


def test_too_few_records_for_one_global_batch(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, FINETUNE, "train.global_batch_size=4096", "train.micro_batch_size=2048")
    assert code == 2
    assert err == [
        f"error: train.global_batch_size: {TOPICS} holds 2000 records, 1900 for training after "
        "data.eval_fraction 0.05 holds out 100: fewer than one global batch of 4096; lower "
        "train.global_batch_size or add data"
    ]


def test_when_only_the_held_out_records_are_missing_the_message_says_eval_fraction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 2000 records, 100 held out: 1900 cannot fill 1950, 2000 would.
    code, err = check(capsys, FINETUNE, "train.global_batch_size=1950", "train.micro_batch_size=975")
    assert code == 2
    assert len(err) == 1
    assert err[0].endswith("lower train.global_batch_size or data.eval_fraction, or add data")
    fewer_held_out = ("train.global_batch_size=1950", "train.micro_batch_size=975", "data.eval_fraction=0.02")
    assert check(capsys, FINETUNE, *fewer_held_out)[0] == 0
    # The workers' rule exactly: 1900 training records fill a global batch of 1900.
    assert check(capsys, FINETUNE, "train.global_batch_size=1900", "train.micro_batch_size=950")[0] == 0


def test_sft_records_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, SFT, "train.global_batch_size=2048", "train.micro_batch_size=1024")
    assert code == 2
    assert len(err) == 1
    assert "questions.jsonl holds 2000 records, 1900 for training" in err[0]


def test_records_are_counted_across_files_and_blank_lines_are_not_records(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a = jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": 0}] * 20)
    b = tmp_path / "b.jsonl"
    b.write_text('\n{"text": "b", "label": 1}\n  \n' * 20)
    overrides = ("data.eval_fraction=0", paths(a, b))
    assert (
        check(capsys, FINETUNE, *overrides, "train.global_batch_size=40", "train.micro_batch_size=20")[0] == 0
    )
    code, err = check(capsys, FINETUNE, *overrides, "train.global_batch_size=42", "train.micro_batch_size=21")
    assert code == 2
    assert err == [
        "error: train.global_batch_size: the 2 files of data.paths hold 40 records: fewer than one global "
        "batch of 42; lower train.global_batch_size or add data"
    ]


def test_unpacked_lm_rows_are_the_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(
        capsys, BERT, "data.pack=false", "train.global_batch_size=2048", "train.micro_batch_size=1024"
    )
    assert code == 2
    assert len(err) == 1
    assert "corpus.txt holds 1200 records, one per row (data.pack false), 1140 for training" in err[0]


def test_packed_rows_are_refused_only_beyond_one_token_per_byte(capsys: pytest.CaptureFixture[str]) -> None:
    # corpus.txt: 435255 bytes, so at most 435256 tokens and 7020 rows of 62; 6669 after the 5 % held out.
    code, err = check(capsys, BERT, "train.global_batch_size=8192", "train.micro_batch_size=4096")
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(
        f"error: train.global_batch_size: {RECIPES / 'data' / 'corpus.txt'} tokenizes to at most"
    )
    assert (
        "at most 7020 packed rows of 62 tokens (data.seq_len 64 less [CLS] and [SEP]), 6669 for training"
        in err[0]
    )
    # Below the bound check cannot be certain (the workers count the tokens): no refusal on a guess.
    assert check(capsys, BERT, "train.global_batch_size=6656", "train.micro_batch_size=3328")[0] == 0


@pytest.mark.parametrize("trainer", ["_train_wordpiece", "_train_bpe"])
def test_the_trained_tokenizers_make_no_more_tokens_than_bytes(tmp_path: Path, trainer: str) -> None:
    """The packed bound (data_check._token_bound): tokens <= UTF-8 bytes of each text."""
    from tokenizers import Tokenizer

    from launcher.plan import vocab

    texts = [
        "Ünïcödé ÀÉÎ İstanbul ﬃ straße ΐ 한국어 日本語 😀🚀 x",
        "tabs\tand  spaces, punctuation!!! ... ???",
        *(RECIPES / "data" / "corpus.txt").read_text().splitlines()[:100],
    ]
    getattr(vocab, trainer)(texts, tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / vocab.TOKENIZER_FILE))
    for text, enc in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False), strict=True):
        assert len(enc.ids) <= len(text.encode("utf-8")), text


# --------------------------------------------------------------------------- cost and what is left alone


def test_a_large_file_is_read_only_as_far_as_needed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "some words here", "label": 1}\n' * 200_000)
    seen = []
    lines = records._lines

    def counted(path: str) -> Iterator[tuple[int, str]]:
        for item in lines(path):
            seen.append(item)
            yield item

    monkeypatch.setattr(records, "_lines", counted)
    assert check(capsys, FINETUNE, paths(big))[0] == 0
    assert len(seen) == data_check.MAX_RECORDS
    fields = data_check.needed_fields(load(FINETUNE))
    read = data_check.scan(str(big), "big.jsonl", "jsonl", fields, lambda n: n >= 5000)
    assert (read.records_read, read.complete, read.problem) == (5000, False, None)


def test_synthetic_data_and_a_data_target_are_left_to_the_workers() -> None:
    recipe = load(BERT, ["data.kind=synthetic", "data.paths=[]", "data.num_samples=8"])
    assert data_check.problems(recipe, (), 4096, True) == []
    empty = "/nonexistent/empty.jsonl"  # a data.target's dataset is the data; no file is read
    target = recipe.data.model_copy(update={"target": "mine:dataset", "kind": "jsonl", "paths": [empty]})
    assert data_check.problems(recipe.model_copy(update={"data": target}), (empty,), 4096, True) == []


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_still_checks_ok(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, err = check(capsys, path)
    assert code == 0
    assert not [line for line in err if line.startswith("error:")]
