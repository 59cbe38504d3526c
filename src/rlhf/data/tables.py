"""Records from the file formats preference data and prompts come in, recognised by content first
and by name second:

  folder    written by `datasets`' `save_to_disk`: a Dataset, or a DatasetDict (its "train" split,
            or its only split; the reader says which)
  Parquet   any file that starts with Parquet's magic bytes, whatever its name
  .jsonl    one JSON object per line; messages name the 1-based line
  .json     a JSON array of objects (messages name the 0-based row), or one object per line
  .csv/.tsv a header row naming the columns, then one record per row (messages name the line);
            every cell is text, but for a `margin` column, whose cells are read as numbers
Any other name holding JSON (first character `{` or `[`) is read as .json. `datasets` and `pyarrow`
are imported only for the formats that need them, so JSONL stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .files import _BOM, _decode, _err, _json_lines, _parse_json, _read_bytes, _split

FORMATS = (
    ".jsonl (one JSON record per line), .json (an array of records, or one per line), "
    ".csv or .tsv (with a header row), .parquet, or a folder saved with datasets' save_to_disk"
)
_PARQUET_MAGIC = b"PAR1"
_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".ndjson")
_DELIMITED = {".csv": ",", ".tsv": "\t"}
_TABULAR = (".xlsx", ".xls", ".ods")  # never read as plain-text prompts


@dataclass
class Table:
    """The records of one file or split, each with where it came from, for messages."""

    name: str
    """the file, or a DatasetDict's split folder, as messages name it"""
    records: list[tuple[dict[str, int], Any]]
    """(where, parsed value): where is {"line": 1-based line} or {"row": 0-based row}"""
    columns: list[str] | None = None
    """column names of a columnar format (Parquet, datasets), checked once before the rows"""


def where(name: str | Path, at: dict[str, int]) -> str:
    """A record's place as messages write it: `prefs.jsonl:3`, `prefs.parquet: row 3 (0-based)`."""
    return f"{name}:{at['line']}" if "line" in at else f"{name}: row {at['row']} (0-based)"


def read_table(path: str | Path, what: str, plain_text_ok: bool = False) -> Table | None:
    """The records in `path`, whose format is one of the module docstring's.

    `what` names the data in the message for an unknown format ("preference data"). With
    `plain_text_ok`, a file in no known format gives None, for the caller to read as plain text.
    """
    p = Path(path)
    if p.is_dir():
        return _dataset_folder(p, what)
    suffix = p.suffix.lower()
    if _read_bytes(p, len(_PARQUET_MAGIC)) == _PARQUET_MAGIC or suffix in _PARQUET:
        return _parquet(p)
    if suffix in _JSONL:
        return Table(str(path), [({"line": n}, v) for n, v in _json_lines(path)])
    if suffix in _DELIMITED:
        return _delimited(p, _DELIMITED[suffix])
    if suffix in _TABULAR:
        raise _unknown(path, suffix, what, plain_text_ok)
    data = _read_bytes(p)
    if suffix == ".json" or (
        not plain_text_ok and data.removeprefix(_BOM).lstrip()[:1] in (b"{", b"[")
    ):
        return _json_document(path, data)
    if plain_text_ok:
        return None
    _split(path, data)  # an empty file says so
    raise _unknown(path, suffix, what, plain_text_ok)


def _unknown(path: str | Path, suffix: str, what: str, plain_text_ok: bool):
    kind = f"{suffix} files" if suffix else "this file (no extension, and not JSON)"
    text = ", or plain text, one prompt per line" if plain_text_ok else ""
    return _err(path, f"cannot read {kind} as {what}; rlhf reads {FORMATS}{text}")


def _json_document(path: str | Path, data: bytes) -> Table:
    """A JSON array of records, or JSONL (one record per line) under a .json name."""
    body = data.removeprefix(_BOM)
    if body.lstrip()[:1] == b"[":
        lines = _split(path, data)
        text = "\n".join(_decode(path, n, raw) for n, raw in enumerate(lines, 1))
        value = _parse_json(path, 1, text)
        if not isinstance(value, list):  # only whitespace before "[": cannot happen
            raise _err(path, "expected a JSON array of records")
        return Table(str(path), [({"row": i}, v) for i, v in enumerate(value)])
    try:
        return Table(str(path), [({"line": n}, v) for n, v in _json_lines(path, data)])
    except InputError as error:
        # A pretty-printed single object fails on its first line; say what the file holds.
        try:
            whole = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            raise error from None
        if isinstance(whole, dict):
            raise _err(
                path, "holds one JSON object over several lines; expected an array of records "
                "[{...}, ...] or one record per line",
            ) from None  # fmt: skip
        raise


def _delimited(path: Path, sep: str) -> Table:
    """CSV or TSV: a header row, then records; the standard library's reader (quoted cells may
    hold the delimiter and line breaks). Messages name the line a record ends on."""
    import csv
    import io

    data = _read_bytes(path).removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f"is not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise _err(path, "is empty; expected a header row naming the columns")
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise _err(path, f"names column {twice[0]!r} twice in its header", line=1)
        records = []
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                msg = f"has {len(row)} cells where the header names {len(header)} columns"
                raise _err(path, msg, line=reader.line_num)
            record: dict[str, Any] = dict(zip(header, row))
            if "margin" in record:
                record["margin"] = _number(record["margin"])
            records.append(({"line": reader.line_num}, record))
    except csv.Error as e:
        raise _err(path, f"cannot be read as {'CSV' if sep == ',' else 'TSV'}: {e}",
                   line=reader.line_num) from None  # fmt: skip
    return Table(str(path), records, header)


def _number(cell: str) -> Any:
    """A margin cell: empty is no margin; a number is read as one; other text stays text, for the
    record's check to refuse with its own message."""
    if not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
        rows = table.to_pylist()
    except FileNotFoundError:
        raise _err(path, "does not exist") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _err(path, f"cannot be read as Parquet: {_first_line(e)}") from None
    return Table(str(path), [({"row": i}, r) for i, r in enumerate(rows)], table.column_names)


def _dataset_folder(path: Path, what: str) -> Table:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise _err(
            path, "is a directory, not a dataset saved with datasets' save_to_disk (it has no "
            f"dataset_dict.json or state.json); {what} is read from {FORMATS}",
        )  # fmt: skip
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder raises many kinds (JSON, Arrow, OS, ...)
        raise _err(path, f"cannot be read as a datasets folder: {_first_line(e)}") from None
    name = path
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if not splits:
            raise _err(path, "is a DatasetDict with no splits")
        if "train" not in splits and len(splits) > 1:
            shown = ", ".join(repr(s) for s in splits)
            raise _err(
                path, f"has splits {shown} and none is 'train'; give the folder of the one to "
                f"read, such as {path / splits[0]}",
            )  # fmt: skip
        split = "train" if "train" in splits else splits[0]
        print(f"{path}: reading its '{split}' split (splits: {', '.join(splits)})")
        loaded, name = loaded[split], path / split  # save_to_disk keeps each split in a folder
    try:
        rows = loaded.to_list()
    except Exception as e:
        raise _err(name, f"cannot be read as a datasets folder: {_first_line(e)}") from None
    return Table(str(name), [({"row": i}, r) for i, r in enumerate(rows)], loaded.column_names)
