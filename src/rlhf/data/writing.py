"""Writing files so that nothing already written is lost: atomic replacement and JSONL appends.

Writers replace their target atomically, so a crash or a bad record never leaves a half-written
file or destroys the previous one; `JsonlWriter` appends one flushed line at a time.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .files import _err


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
