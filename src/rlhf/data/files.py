"""Reading files for the readers: bytes, JSONL lines, JSON values, and the one-line messages.

Every problem with a file's content becomes an `InputError` whose message names the file and
where in it: `prefs.jsonl:3: field 'chosen': is empty` for the 1-based line of a JSONL file,
`prefs.parquet: row 3 (0-based): field 'chosen': ...` for a row of a table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError, input_error

_BOM = b"\xef\xbb\xbf"


# --- messages ----------------------------------------------------------------------------------


def _show(value: Any, limit: int = 40) -> str:
    """`repr` of an offending value, cut to `limit` characters so a message stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _err(
    path: str | Path,
    message: str,
    line: int | None = None,
    row: int | None = None,
    field: str | None = None,
) -> InputError:
    """`input_error` naming a 1-based `line` or a 0-based `row`; line breaks in a path must not
    break the one line."""
    shown = str(path).replace("\r", "\\r").replace("\n", "\\n")
    if row is not None:
        shown = f"{shown}: row {row} (0-based)"
    return input_error(shown, message, line=line, field=field)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, which is what the user wrote in the file."""
    if isinstance(value, bool):
        return "boolean"
    names = {int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    return f"{_json_type(value)} {_show(value)}"


# --- reading lines -----------------------------------------------------------------------------


def _read_bytes(path: str | Path, limit: int = -1) -> bytes:
    """The file's bytes (its first `limit` bytes when `limit` >= 0)."""
    p = Path(path)
    if p.is_dir():  # checked first: Windows reports a directory as "permission denied"
        raise _err(path, "is a directory, expected a file")
    try:
        with open(p, "rb") as fh:
            return fh.read(limit)
    except FileNotFoundError:
        raise _err(path, "does not exist") from None
    except OSError as e:
        raise _err(path, f"cannot be read: {e.strerror or e}") from None


def _split(path: str | Path, data: bytes) -> list[bytes]:
    """Raw lines, split on b"\\n" only: JSON strings may hold U+2028, which `splitlines` breaks on."""
    if not data:
        raise _err(path, "is empty; expected one record per line")
    return data.removeprefix(_BOM).split(b"\n")


def _decode(path: str | Path, lineno: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at position {e.start + 1} of the line"
        raise _err(path, f"not valid UTF-8: {bad}; save the file as UTF-8", line=lineno) from None
    return text.removesuffix("\r")


def _parse_json(path: str | Path, lineno: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # A document spanning lines reports its own line; a JSONL line is line `lineno`.
        line = lineno + e.lineno - 1
        raise _err(path, f"not valid JSON: {e.msg} (column {e.colno})", line=line) from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        reason = str(e).split(":")[0][:80]
        raise _err(path, f"not valid JSON: {reason}", line=lineno) from None
    except RecursionError:
        raise _err(path, "not valid JSON: nested too deeply", line=lineno) from None


def _json_lines(path: str | Path, data: bytes | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; raises on the first bad one."""
    data = _read_bytes(path) if data is None else data
    for lineno, raw in enumerate(_split(path, data), 1):
        text = _decode(path, lineno, raw)
        if text.strip():
            yield lineno, _parse_json(path, lineno, text)


def _object(path: str | Path, value: Any, **at: int) -> dict[str, Any]:
    """`value` if it is a JSON object; `at` is `line=` or `row=`, for the message."""
    if not isinstance(value, dict):
        raise _err(path, f"record must be a JSON object {{...}}, got {_got(value)}", **at)
    return value


def read_jsonl(path: str | Path, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file of objects (such as metrics.jsonl), with the readers' error reporting.

    A writer killed mid-line leaves a last line with no trailing newline; that line is skipped when
    it does not parse. Any other bad line is an error. An empty file, or one with only blank lines,
    is an error unless `allow_empty`.
    """
    data = _read_bytes(path)
    if not data and allow_empty:
        return []
    lines = _split(path, data)
    complete = data.endswith(b"\n")
    rows = []
    for lineno, raw in enumerate(lines, 1):
        try:
            text = _decode(path, lineno, raw)
            if not text.strip():
                continue
            value = _parse_json(path, lineno, text)
        except InputError:
            if lineno == len(lines) and not complete:
                break  # the killed writer's partial line
            raise
        rows.append(_object(path, value, line=lineno))
    if not rows and not allow_empty:
        raise _err(path, "has no complete records")
    return rows
