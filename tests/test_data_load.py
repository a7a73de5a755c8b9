"""load_rows: every file type, where-tags, and one-line errors naming file:line or row."""

from __future__ import annotations

import json

import datasets
import pytest

from posttrain.data.load import load_rows
from posttrain.errors import UserError


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_tags_file_lines_and_skips_blank_lines(tmp_path):
    src = write(tmp_path / "chats.jsonl", '{"text": "a"}\n\n  \n{"text": "b"}\n')
    rows = load_rows(src)
    assert rows == [(f"{src}:1", {"text": "a"}), (f"{src}:4", {"text": "b"})]


def test_jsonl_invalid_line_is_named(tmp_path):
    src = write(tmp_path / "chats.jsonl", '{"text": "a"}\n' * 16 + "{oops\n")
    with pytest.raises(UserError, match=r"chats\.jsonl:17: invalid JSON \(Expecting property name"):
        load_rows(src)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    src = write(tmp_path / "chats.jsonl", '{"text": "a"}\n["a", "b"]\n')
    with pytest.raises(UserError, match=r"chats\.jsonl:2: row is a list"):
        load_rows(src)


def test_json_list_and_json_lines_named_json(tmp_path):
    src = write(tmp_path / "d.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_rows(src) == [(f"{src}:row 1", {"text": "a"}), (f"{src}:row 2", {"text": "b"})]
    lines = write(tmp_path / "l.json", '{"text": "a"}\n{"text": "b"}\n')
    assert [w for w, _ in load_rows(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_json_errors(tmp_path):
    obj = write(tmp_path / "o.json", '{"data": []}')
    with pytest.raises(UserError, match=r"o\.json: expected a JSON list of objects, got dict"):
        load_rows(obj)
    bad = write(tmp_path / "b.json", '[{"text": "a"},\n 3]')
    with pytest.raises(UserError, match=r"b\.json:row 2: row is a number"):
        load_rows(bad)


def test_csv_rows(tmp_path):
    src = write(tmp_path / "d.csv", 'prompt,completion\nhi,"hello, you"\n')
    assert load_rows(src) == [(f"{src}:row 1", {"prompt": "hi", "completion": "hello, you"})]


def test_parquet_rows(tmp_path):
    src = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).to_parquet(src)
    assert load_rows(src) == [(f"{src}:row 1", {"text": "a"}), (f"{src}:row 2", {"text": "b"})]


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match=r"^data\.jsonl: file not found$"):
        load_rows("data.jsonl")
    with pytest.raises(UserError, match="file not found"):
        load_rows(str(tmp_path / "nested" / "x"))
    empty = write(tmp_path / "chats.jsonl", "\n\n")
    with pytest.raises(UserError, match=r"chats\.jsonl: no rows$"):
        load_rows(empty)


def test_unsupported_suffix(tmp_path):
    src = write(tmp_path / "d.txt", "hello")
    with pytest.raises(UserError, match="unsupported file type"):
        load_rows(src)


def test_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("owner/name", split="test")
    assert calls == [("owner/name", "test")]
    assert rows[1] == ("owner/name[test]:1", {"text": "b"})


def test_hub_failure_is_a_user_error(monkeypatch):
    def fail(name, split):
        raise ConnectionError("Couldn't reach 'owner/nope' on the Hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(UserError) as info:
        load_rows("owner/nope")
    assert str(info.value) == (
        "owner/nope: cannot load dataset (ConnectionError: Couldn't reach 'owner/nope' on the Hub)"
    )
