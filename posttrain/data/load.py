"""Load raw data rows from a local file or a Hugging Face dataset, tagged with where they came from.

`load_rows(source)` returns `[(where, row), ...]` where `row` is a dict and `where` names the
row for error messages:

- `.jsonl`: `chats.jsonl:17` (the file line, 1-based; blank lines are skipped);
- `.json` (a list of objects), `.csv`, `.parquet`: `data.csv:row 3` (1-based data row);
- a hub dataset name (`owner/name` or `name`) or a local dataset folder: `owner/name[train]:41`
  (the 0-based index, so `dataset[41]` finds it).

Simplified on purpose: everything is read into memory (no streaming); CSV cells stay strings
(no type inference, no JSON inside cells); a `.json` file must be a list of objects, except
that JSON lines written with a `.json` name (as `datasets.Dataset.to_json` does) are accepted.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

Row = tuple[str, dict]

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_rows(source: str, split: str = "train") -> list[Row]:
    """Rows of `source` (a data file, a dataset folder or a hub dataset name) as (where, dict)."""
    path = Path(source)
    if path.is_dir():
        rows = _read_hub(source, split)
    elif path.is_file():
        rows = _read_file(source, path)
    elif _looks_like_hub_name(source):
        rows = _read_hub(source, split)
    else:
        raise UserError(f"{source}: file not found")
    if not rows:
        raise UserError(f"{source}: no rows")
    return rows


def _looks_like_hub_name(source: str) -> bool:
    return bool(HUB_NAME.match(source)) and not source.lower().endswith(FILE_TYPES)


def _read_file(source: str, path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(source, _read_text(source, path))
    if suffix == ".json":
        return _read_json(source, _read_text(source, path))
    if suffix == ".csv":
        return _read_csv(source, _read_text(source, path))
    if suffix == ".parquet":
        return _read_parquet(source, path)
    raise UserError(
        f"{source}: unsupported file type; use {', '.join(FILE_TYPES)} or a dataset name"
    )


def _read_text(source: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(source: str, text: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg})") from None
        rows.append((where, _check_object(where, row)))
    return rows


def _read_json(source: str, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if (
            exc.msg == "Extra data"
        ):  # JSON lines under a .json name (datasets' to_json writes these)
            return _read_jsonl(source, text)
        raise UserError(f"{source}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of objects, got {_kind(data)}")
    return [_tagged(f"{source}:row {i}", row) for i, row in enumerate(data, start=1)]


def _read_csv(source: str, text: str) -> list[Row]:
    csv.field_size_limit(2**31 - 1)  # long texts exceed the 128 KiB default
    try:
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
    except csv.Error as exc:
        raise UserError(f"{source}:{reader.line_num}: invalid CSV ({exc})") from None
    for i, row in enumerate(rows, start=1):
        if None in row:
            raise UserError(f"{source}:row {i}: more cells than header columns")
    return [(f"{source}:row {i}", dict(row)) for i, row in enumerate(rows, start=1)]


def _read_parquet(source: str, path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{source}: cannot read parquet ({_first_line(exc)})") from None
    return [_tagged(f"{source}:row {i}", row) for i, row in enumerate(records, start=1)]


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except (
        Exception
    ) as exc:  # network, missing dataset, unknown split, bad files: all the user's to fix
        raise UserError(
            f"{name}: cannot load dataset ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return [_tagged(f"{name}[{split}]:{i}", row) for i, row in enumerate(ds)]


def _tagged(where: str, row: Any) -> Row:
    return where, _check_object(where, row)


def _check_object(where: str, row: Any) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: row is {_kind(row)}, expected an object with named fields")
    return row


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
