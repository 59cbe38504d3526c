"""Preference and prompt records, JSONL reading and validation, and atomic writes.

Every reader turns bad file content into an `InputError` whose one-line message names the file,
the 1-based line and the field (`prefs.jsonl:3: field 'chosen': is empty`); no other exception
type escapes for bad content. Writers replace their target atomically, so a crash or a bad record
never leaves a half-written file or destroys the previous one.

Preference records, one JSON object per line (blank lines are skipped, extra keys ignored):
  seed format    {"prompt": str, "response_A": str, "response_B": str, "preference": "A" | "B"}
  common format  {"prompt": str, "chosen": str, "rejected": str, "margin": number (optional)}
A record holding both `chosen` and `rejected` is read in the common format.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, input_error

_BOM = b"\xef\xbb\xbf"
_COMMON = ("prompt", "chosen", "rejected")
_SEED = ("prompt", "response_A", "response_B", "preference")
_FORMATS = (
    "a record needs {prompt, chosen, rejected[, margin]} "
    "or {prompt, response_A, response_B, preference}"
)


@dataclass(frozen=True)
class PreferencePair:
    """One human judgement: `chosen` was preferred over `rejected` as a reply to `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


# --- messages ----------------------------------------------------------------------------------


def _show(value: Any, limit: int = 40) -> str:
    """`repr` of an offending value, cut to `limit` characters so a message stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _err(path: str | Path, message: str, **where: Any) -> InputError:
    """`input_error` with `line=`/`field=`; line breaks in a path must not break the one line."""
    shown = str(path).replace("\r", "\\r").replace("\n", "\\n")
    return input_error(shown, message, **where)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, which is what the user wrote in the file."""
    if isinstance(value, bool):
        return "boolean"
    names = {int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- reading lines -----------------------------------------------------------------------------


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if p.is_dir():  # checked first: Windows reports a directory as "permission denied"
        raise _err(path, "is a directory, expected a file")
    try:
        return p.read_bytes()
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
        raise _err(path, f"not valid JSON: {e.msg} (column {e.colno})", line=lineno) from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        reason = str(e).split(":")[0][:80]
        raise _err(path, f"not valid JSON: {reason}", line=lineno) from None
    except RecursionError:
        raise _err(path, "not valid JSON: nested too deeply", line=lineno) from None


def _json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; raises on the first bad one."""
    for lineno, raw in enumerate(_split(path, _read_bytes(path)), 1):
        text = _decode(path, lineno, raw)
        if text.strip():
            yield lineno, _parse_json(path, lineno, text)


def _object(path: str | Path, lineno: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        got = f"{_json_type(value)} {_show(value)}"
        raise _err(path, f"record must be a JSON object {{...}}, got {got}", line=lineno)
    return value


# --- preference records ------------------------------------------------------------------------


def _string(rec: dict, key: str, path: str | Path, lineno: int, *, blank_ok: bool = False) -> str:
    value = rec[key]
    if not isinstance(value, str):
        got = f"{_json_type(value)} {_show(value)}"
        raise _err(path, f"expected a string, got {got}", line=lineno, field=key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"\\u{ord(value[e.start]):04x}"
        raise _err(path, f"holds an unpaired surrogate {bad}", line=lineno, field=key) from None
    if not blank_ok and not value.strip():
        what = "is empty" if not value else "is whitespace only"
        raise _err(path, f"{what}; a response needs text", line=lineno, field=key)
    return value


def _margin(rec: dict, path: str | Path, lineno: int) -> float | None:
    value = rec.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = f"{_json_type(value)} {_show(value)}"
        raise _err(path, f"expected a number, got {got}", line=lineno, field="margin")
    try:
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        raise _err(path, f"must be finite, got {_show(value)}", line=lineno, field="margin")
    return margin


def _missing(rec: dict, path: str | Path, lineno: int) -> InputError:
    """Name what a record lacks, judged against the format it is closest to."""
    common = any(k in rec for k in ("chosen", "rejected"))
    seed = any(k in rec for k in ("response_A", "response_B", "preference"))
    wanted = _SEED if seed and not common else _COMMON
    missing = [k for k in wanted[1:] + wanted[:1] if k not in rec]  # the prompt last
    also = f", as are {', '.join(repr(k) for k in missing[1:])}" if missing[1:] else ""
    return _err(path, f"missing{also}; {_FORMATS}", line=lineno, field=missing[0])


def _to_pair(value: Any, path: str | Path, lineno: int) -> PreferencePair:
    rec = _object(path, lineno, value)
    if all(k in rec for k in _COMMON):
        first, second = "chosen", "rejected"
    elif all(k in rec for k in _SEED):
        first, second = "response_A", "response_B"
    else:
        raise _missing(rec, path, lineno)
    prompt = _string(rec, "prompt", path, lineno, blank_ok=True)  # some data sets have no prompt
    a = _string(rec, first, path, lineno)
    b = _string(rec, second, path, lineno)
    if first == "response_A":
        label = _string(rec, "preference", path, lineno, blank_ok=True)
        if label not in ("A", "B"):
            msg = f"must be 'A' or 'B', got {_show(label)}"
            raise _err(path, msg, line=lineno, field="preference")
        if label == "B":
            a, b = b, a
    if a == b:
        raise _err(path, f"{first} and {second} are identical", line=lineno, field=second)
    return PreferencePair(prompt, a, b, _margin(rec, path, lineno))


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file of preference records in either format (see the module docstring)."""
    pairs = [_to_pair(value, path, lineno) for lineno, value in _json_lines(path)]
    if not pairs:
        raise _err(path, "has no records, only blank lines")
    return pairs


def _pair_record(pair: PreferencePair) -> dict[str, Any]:
    rec: dict[str, Any] = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.margin is not None:
        rec["margin"] = pair.margin
    return rec


def write_preferences(
    path: str | Path, records: Iterable[PreferencePair | Mapping[str, Any]]
) -> None:
    """Write preference records as JSONL, atomically.

    A `PreferencePair` is written in the common format (with `margin` when set); a mapping in either
    format is written as given, extra keys included. Every record is checked as `read_preferences`
    would check it, so a file written here always reads back; a bad record raises `InputError`
    naming the line it would have taken, and nothing is written.
    """
    lines = []
    for lineno, record in enumerate(records, 1):
        if isinstance(record, PreferencePair):
            rec = _pair_record(record)
        elif isinstance(record, Mapping):
            rec = dict(record)
        else:
            raise TypeError(f"expected PreferencePair or a mapping, got {type(record).__name__}")
        _to_pair(rec, path, lineno)
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if not lines:
        raise _err(path, "no records to write")
    atomic_write_text(path, "".join(lines))


# --- prompts and generic JSONL -----------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts for rollouts.

    `.jsonl` / `.json`: one JSON object per line with a string `prompt` (which may be empty), so a
    preference file also works. Anything else: plain text, one prompt per line; blank lines are
    skipped and only the line terminator is removed, so spaces inside a prompt are kept.
    """
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for lineno, value in _json_lines(path):
            rec = _object(path, lineno, value)
            if "prompt" not in rec:
                msg = 'missing; each line needs {"prompt": "..."}'
                raise _err(path, msg, line=lineno, field="prompt")
            prompts.append(_string(rec, "prompt", path, lineno, blank_ok=True))
    else:
        lines = _split(path, _read_bytes(path))
        prompts = [t for n, raw in enumerate(lines, 1) if (t := _decode(path, n, raw)).strip()]
    if not prompts:
        raise _err(path, "has no prompts, only blank lines")
    return prompts


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
        rows.append(_object(path, lineno, value))
    if not rows and not allow_empty:
        raise _err(path, "has no complete records")
    return rows


def _jsonable(obj: Any) -> Any:
    """`json.dumps` fallback: paths as strings, torch/numpy scalars as Python numbers."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(getattr(obj, "item", None)):
        return obj.item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _jsonl_line(row: Mapping[str, Any]) -> str:
    if not isinstance(row, Mapping):
        raise TypeError(f"a JSONL row must be a mapping, got {type(row).__name__}")
    return json.dumps(dict(row), ensure_ascii=False, default=_jsonable) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as JSONL (one object per line), atomically."""
    atomic_write_text(path, "".join(_jsonl_line(row) for row in rows))


class JsonlWriter:
    """Append one JSON line per `write(row)`, flushed at once, so a killed run keeps every row
    written before it died. Used for metrics.jsonl during training.

    With `append=True` (the default) an existing file is continued; a partial last line left by a
    killed writer is completed with a newline when it parses and cut off when it does not, so new
    rows never run into it. `append=False` starts the file afresh.
    """

    def __init__(self, path: str | Path, *, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            _repair_tail(self.path)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8", newline="\n")

    def write(self, row: Mapping[str, Any]) -> None:
        self._fh.write(_jsonl_line(row))  # one call per line: a kill can only cut the last one
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repair_tail(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        keep = isinstance(json.loads(data[start:].decode("utf-8")), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        keep = False
    with open(path, "r+b") as fh:
        if keep:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(start)


# --- atomic writes -----------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, move it onto `path`.

    The caller writes the temporary path with any library (`open`, `torch.save`, safetensors'
    `save_file`); it is then fsynced, renamed over `path` with `os.replace` (atomic on POSIX and
    Windows) and the directory fsynced where supported. If the block raises, the temporary file is
    removed and an existing `path` is left untouched. Parent directories are created.
    """
    path = Path(path)
    if path.is_dir():
        raise _err(path, "is a directory; give a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _err(path, f"cannot create its folder: {e.strerror or e}") from e
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"atomic_write: the block wrote nothing to {tmp}")
    try:
        if path.exists():  # keep the permissions of the file being replaced
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        _fsync(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows needs write access
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _err(path, f"cannot write: {e.strerror or e}") from e
    if os.name != "nt":  # make the rename itself durable; Windows cannot open a directory
        with suppress(OSError):
            _fsync(path.parent, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` as UTF-8, exactly as given (no newline translation), atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON with a trailing newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")
