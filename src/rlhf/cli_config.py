"""`--config FILE.yaml`: a command's options read from a file, checked against the command's own
options, so that a file can say nothing the command line could not.

Keys are the options' names without the dashes (`kl_coef` or `kl-coef`); an option given on the
command line wins over the file. Keys that start with `_` are notes, not options, and are skipped:
so `config.json`, which a run writes beside its outputs with its environment under
`_environment`, is a valid `--config` too (YAML reads JSON). Unknown keys, a value of the wrong
type and a key given twice are refused in one line naming the file, the line and the key.

Every run writes `config.yaml` beside its outputs (`tracking.save_config`): the options it ran
with, resolved, so `rlhf ppo --config runs/x/config.yaml` runs it again.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from .errors import ConfigError

_BOOL_ACTIONS = (
    argparse.BooleanOptionalAction,
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
)


def read_config_file(path: str | Path, command: argparse.ArgumentParser) -> dict:
    """{dest: value} for the options that the YAML (or JSON) file at `path` sets for `command`.

    Raises `ConfigError` reading `FILE:LINE: key 'K': what is wrong`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}  # an empty file sets nothing
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(
                f"{path}:{root.start_mark.line + 1}: a config file is a mapping of option names "
                "to values (kl_coef: 0.05), not a list or a single value"
            )
        pairs = [(k, v, loader.construct_object(v, deep=True)) for k, v in root.value]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()

    actions = {a.dest: a for a in command._actions if a.option_strings}  # argparse has no index
    options = sorted(d for d in actions if d not in ("help", "config"))
    values: dict = {}
    first_line: dict[str, int] = {}
    for key_node, _, value in pairs:
        key, line = key_node.value, key_node.start_mark.line + 1
        where = f"{path}:{line}"
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: option names are text, got {key!r}")
        if key.startswith("_"):
            continue  # a note (config.json's _environment), not an option
        dest = key.replace("-", "_")
        if dest in ("config", "help"):
            raise ConfigError(f"{where}: key '{key}': not allowed in a config file")
        action = actions.get(dest)
        if action is None:
            close = difflib.get_close_matches(dest, options, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else f" (see {command.prog} --help)"
            raise ConfigError(f"{where}: key '{key}': {command.prog} has no such option{hint}")
        if dest in first_line:
            raise ConfigError(
                f"{where}: key '{key}': given twice (first on line {first_line[dest]})"
            )
        first_line[dest] = line
        try:
            values[dest] = _convert(action, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: key '{key}': {exc}") from None
    return values


def _convert(action: argparse.Action, value):
    """`value` as the command line would have given it to `action`, or ValueError saying why."""
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"needs a value (default: {action.default})")
    if isinstance(action, _BOOL_ACTIONS):
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(action, argparse._AppendAction):  # a repeatable option: a list, or one value
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (list, dict, bool)) for v in items):
            raise ValueError(f"expected a list of values, got {value!r}")
        return [action.type(str(v)) if action.type else str(v) for v in items]
    if isinstance(value, (dict, set)):
        raise ValueError(f"expected a single value, got {type(value).__name__} {value!r}")
    if isinstance(value, list):
        # A comma-separated option (sweep's --kl-coefs 0,0.1) may be written as a YAML list.
        if action.type not in (None, str) or any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"expected a single value, got the list {value!r}")
        value = ",".join(str(v) for v in value)
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
    elif kind is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            value = float(value)  # PyYAML reads 3e-5 (no dot) as text; float() reads it
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    elif kind in (None, str):
        if isinstance(value, bool):
            raise ValueError(f"expected text, got {value!r}")
        value = str(value)
    else:  # the option's own parser (--threads)
        try:
            value = kind(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(str(exc) or f"invalid value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ValueError(f"expected one of {choices}, got {value!r}")
    return value
