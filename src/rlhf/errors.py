"""Errors a user can fix.

The CLI prints an `RLHFError` as one line (no traceback) and exits with code 2. Library callers
can catch it like any exception.
"""

from __future__ import annotations

from pathlib import Path


class RLHFError(Exception):
    """A problem with the user's input or configuration, with a message that says how to fix it."""


class InputError(RLHFError):
    """A bad input file, record or model folder."""


class ConfigError(RLHFError):
    """A bad option or config value."""


def input_error(
    path: str | Path, message: str, line: int | None = None, field: str | None = None
) -> InputError:
    """Build an `InputError` whose message reads `FILE:LINE: field 'F': MESSAGE`."""
    where = str(path) if line is None else f"{path}:{line}"
    what = message if field is None else f"field '{field}': {message}"
    return InputError(f"{where}: {what}")
