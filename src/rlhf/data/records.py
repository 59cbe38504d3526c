"""Preference and prompt records: their forms, validation, reading and writing.

Preference records (extra keys are ignored; `prompt_field=`, `chosen_field=` and `rejected_field=`
read other names):
  standard        {"prompt": str, "chosen": str, "rejected": str, "margin": number (optional)}
  conversational  {"prompt": [message, ...], "chosen": [message, ...], "rejected": [message, ...]}
                  with messages {"role": str, "content": str}: the prompt is the conversation so
                  far, chosen and rejected the assistant turn(s) that follow it
  implicit prompt {"chosen": ..., "rejected": ...}, no prompt: two full texts, whose shared start
                  (cut at the last whitespace) is the prompt, or two full conversations that differ
                  only in their last message, which is the response
  seed format     {"prompt": str, "response_A": str, "response_B": str, "preference": "A" | "B"}
A record with both chosen and rejected is read as one of the first three. A file holds text
records or conversations, not both; `rlhf.models.generation.render_conversation_pairs` renders
conversations to text with a tokenizer's chat template.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .files import _decode, _err, _got, _object, _read_bytes, _show, _split
from .tables import Table, read_table, where
from .writing import _jsonl_line, atomic_write_text

Message = dict[str, str]
"""One turn of a conversation: {"role": "user" | "assistant" | "system" | ..., "content": text}."""

_SEED = ("response_A", "response_B", "preference")


class Fields(NamedTuple):
    """The names of a preference record's prompt, chosen and rejected fields."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


_STANDARD = Fields()


@dataclass(frozen=True)
class PreferencePair:
    """One human judgement: `chosen` was preferred over `rejected` as a reply to `prompt`.

    All three are text, or all three are conversations (lists of messages) to be rendered with a
    chat template. `source` says where the record was read, for later messages about it.
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    margin: float | None = None
    source: str = field(default="", compare=False, repr=False)

    @property
    def is_conversation(self) -> bool:
        return isinstance(self.chosen, list)


# --- one record --------------------------------------------------------------------------------


def _string(rec: dict, key: str, path, at: dict, *, blank_ok: bool = False, name: str = "") -> str:
    """`rec[key]` if it is a string (with text unless `blank_ok`); `name` is the field's full name."""
    value = rec[key]
    if not isinstance(value, str):
        raise _err(path, f"expected a string, got {_got(value)}", **at, field=name or key)
    return _text(value, name or key, path, at, blank_ok=blank_ok)


def _text(value: str, key: str, path, at: dict, *, blank_ok: bool) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"\\u{ord(value[e.start]):04x}"
        raise _err(path, f"holds an unpaired surrogate {bad}", **at, field=key) from None
    if not blank_ok and not value.strip():
        what = "is empty" if not value else "is whitespace only"
        raise _err(path, f"{what}; a response needs text", **at, field=key)
    return value


def _messages(rec: dict, key: str, path, at: dict, *, reply: bool) -> list[Message]:
    """A validated conversation: only role and content are kept. A reply's last turn needs text."""
    value = rec[key]
    if not isinstance(value, list):
        raise _err(path, f"expected a list of messages, got {_got(value)}", **at, field=key)
    if not value:
        raise _err(path, 'is an empty list; expected messages {"role": ..., "content": ...}',
                   **at, field=key)  # fmt: skip
    out = []
    for i, message in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(message, dict):
            msg = f'expected a message {{"role": ..., "content": ...}}, got {_got(message)}'
            raise _err(path, msg, **at, field=name)
        for part in ("role", "content"):
            if part not in message:
                msg = 'missing; a message is {"role": str, "content": str}'
                raise _err(path, msg, **at, field=f"{name}.{part}")
            _string(message, part, path, at, blank_ok=True, name=f"{name}.{part}")
        out.append({"role": message["role"], "content": message["content"]})
        if not message["role"].strip():
            raise _err(path, "is empty; a message needs a role", **at, field=f"{name}.role")
    if reply:
        _text(out[-1]["content"], f"{key}[{len(out) - 1}].content", path, at, blank_ok=False)
    return out


def _margin(rec: dict, path, at: dict) -> float | None:
    value = rec.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(path, f"expected a number, got {_got(value)}", **at, field="margin")
    try:
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        raise _err(path, f"must be finite, got {_show(value)}", **at, field="margin")
    return margin


def _formats(f: Fields) -> str:
    return (
        f"a record needs {{[{f.prompt}, ]{f.chosen}, {f.rejected}[, margin]}} "
        f"or {{{f.prompt}, {', '.join(_SEED)}}}"
    )


def _missing(rec: dict, path, at: dict, f: Fields):
    """Name what a record lacks, judged against the form it is closest to."""
    common = f.chosen in rec or f.rejected in rec
    seed = any(k in rec for k in _SEED)
    wanted = (*_SEED, f.prompt) if seed and not common else (f.chosen, f.rejected)
    missing = [k for k in wanted if k not in rec]
    also = f", as {'is' if len(missing) == 2 else 'are'} {', '.join(map(repr, missing[1:]))}"
    msg = (f"missing{also if missing[1:] else ''} {_fields_of(rec)}; {_formats(f)}; other "
           "names: --prompt-field, --chosen-field, --rejected-field")  # fmt: skip
    return _err(path, msg, **at, field=missing[0])


def _fields_of(rec: dict) -> str:
    """ "(the record's fields: 'a', 'b')", for a message about a missing field: the usual cause is
    a field of another name."""
    names = ", ".join(_show(k, 24) for k in list(rec)[:6]) + (", ..." if len(rec) > 6 else "")
    return f"(the record's fields: {names or 'none'})"


def _shared_start(a: str, b: str) -> int:
    """Where the prompt ends in two full texts: at the last whitespace before they differ, so that
    no word is split; the responses keep that whitespace, so prompt + response is the text."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    return max(n - 1, 0)


def _to_pair(value: Any, path, at: dict, f: Fields = _STANDARD) -> PreferencePair:
    rec = _object(path, value, **at)
    if f.chosen in rec and f.rejected in rec:
        first, second = f.chosen, f.rejected
    elif all(k in rec for k in (f.prompt, *_SEED)):
        first, second = "response_A", "response_B"
    else:
        raise _missing(rec, path, at, f)
    implicit = f.prompt not in rec
    conversation = isinstance(rec[first] if implicit else rec[f.prompt], list)
    if conversation and first == f.chosen:
        prompt = [] if implicit else _messages(rec, f.prompt, path, at, reply=False)
        a = _messages(rec, first, path, at, reply=True)
        b = _messages(rec, second, path, at, reply=True)
        if implicit:
            prompt, a, b = _split_conversations(a, b, path, at, f)
    else:
        prompt = "" if implicit else _string(rec, f.prompt, path, at, blank_ok=True)
        a = _string(rec, first, path, at)
        b = _string(rec, second, path, at)
    if first == "response_A":
        label = _string(rec, "preference", path, at, blank_ok=True)
        if label not in ("A", "B"):
            raise _err(path, f"must be 'A' or 'B', got {_show(label)}", **at, field="preference")
        if label == "B":
            a, b = b, a
    if a == b:
        raise _err(path, f"{first} and {second} are identical", **at, field=second)
    if implicit and not conversation:
        cut = _shared_start(a, b)
        prompt, a, b = a[:cut], a[cut:], b[cut:]
        for key, text in ((first, a), (second, b)):
            if not text.strip():
                msg = (f"has no text after the start it shares with the other (no '{f.prompt}' "
                       "field: implicit prompt)")  # fmt: skip
                raise _err(path, msg, **at, field=key)
    return PreferencePair(prompt, a, b, _margin(rec, path, at), where(path, at))


def _split_conversations(a: list, b: list, path, at: dict, f: Fields):
    """Implicit prompt: two whole conversations that differ only in their last message."""
    for key, conv in ((f.chosen, a), (f.rejected, b)):
        if len(conv) < 2:
            msg = (f"has 1 message; with no '{f.prompt}' field a conversation needs the prompt's "
                   "messages and then the reply")  # fmt: skip
            raise _err(path, msg, **at, field=key)
    if a[:-1] != b[:-1]:
        msg = (f"differs from '{f.chosen}' before its last message; with no '{f.prompt}' field "
               "both must be one conversation up to the reply")  # fmt: skip
        raise _err(path, msg, **at, field=f.rejected)
    return a[:-1], a[-1:], b[-1:]


# --- files -------------------------------------------------------------------------------------


def _check_columns(table: Table, wanted: list[tuple[str, ...]], hint: str) -> None:
    """A columnar file lacks a column in every row: say so once, with the columns it has."""
    if table.columns is None or any(set(w) <= set(table.columns) for w in wanted):
        return
    need = next(k for k in wanted[0] if k not in table.columns)
    have = ", ".join(table.columns) or "none"
    raise _err(table.name, f"has no column '{need}' (its columns: {have}); {hint}")


def _kind_check(first: bool, this: bool, name: str, at: dict, key: str) -> None:
    if first != this:
        kinds = ("text", "conversations (lists of messages)")
        msg = f"is {kinds[this]} but the records before are {kinds[first]}; a file holds one kind"
        raise _err(name, msg, **at, field=key)


def read_preferences(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> list[PreferencePair]:
    """Read preference records in any form (module docstring) from any format `read_table` reads."""
    f = Fields(prompt_field, chosen_field, rejected_field)
    table = read_table(path, "preference data")
    _check_columns(
        table, [(f.chosen, f.rejected), (f.prompt, *_SEED)],
        f"{_formats(f)}; name yours with --prompt-field, --chosen-field, --rejected-field",
    )  # fmt: skip
    pairs: list[PreferencePair] = []
    implicit = False
    for at, value in table.records:
        pair = _to_pair(value, table.name, at, f)
        if pairs:
            _kind_check(pairs[0].is_conversation, pair.is_conversation, table.name, at, f.chosen)
        implicit = implicit or f.prompt not in value
        pairs.append(pair)
    if not pairs:
        raise _err(table.name, "has no records")
    if implicit:
        print(
            f"{table.name}: no '{f.prompt}' field in some records; their prompt is the start "
            "that chosen and rejected share (implicit prompt)"
        )
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

    A `PreferencePair` is written in the standard or conversational form (with `margin` when set);
    a mapping in any form is written as given, extra keys included. Every record is checked as
    `read_preferences` would check it, so a file written here always reads back; a bad record
    raises `InputError` naming the line it would have taken, and nothing is written.
    """
    lines = []
    for lineno, record in enumerate(records, 1):
        if isinstance(record, PreferencePair):
            rec = _pair_record(record)
        elif isinstance(record, Mapping):
            rec = dict(record)
        else:
            raise TypeError(f"expected PreferencePair or a mapping, got {type(record).__name__}")
        _to_pair(rec, path, {"line": lineno})
        lines.append(_jsonl_line(rec))
    if not lines:
        raise _err(path, "no records to write")
    atomic_write_text(path, "".join(lines))


def read_prompts(path: str | Path, *, field: str = "prompt") -> list[str | list[Message]]:
    """Read prompts for rollouts.

    From any format `read_table` reads: each record's `field`, a string (which may be empty) or a
    conversation (a list of messages, rendered later with the chat template), so a preference
    file also works. Anything else: plain text, one prompt per line; blank lines are skipped and
    only the line terminator is removed, so spaces inside a prompt are kept.
    """
    return read_prompt_records(path, field=field)[0]


def read_prompt_records(
    path: str | Path, *, field: str = "prompt"
) -> tuple[list[str | list[Message]], dict[str, list]]:
    """(prompts, columns): `read_prompts`' prompts and the records' other fields, one list per
    field name with one value per prompt (None where a record lacks it). Reward functions get
    the columns (an `answer` field reaches a verifier); a plain-text file has none."""
    table = read_table(path, "prompts", plain_text_ok=True)
    if table is None:
        lines = _split(path, _read_bytes(path))
        prompts = [t for n, raw in enumerate(lines, 1) if (t := _decode(path, n, raw)).strip()]
        if not prompts:
            raise _err(path, "has no prompts, only blank lines")
        return prompts, {}
    _check_columns(table, [(field,)], "name yours with --prompt-field")
    prompts, others = [], []
    for at, value in table.records:
        rec = _object(table.name, value, **at)
        if field not in rec:
            msg = (f'missing {_fields_of(rec)}; each record needs {{"{field}": ...}}, text or a '
                   "list of messages; name yours with --prompt-field")  # fmt: skip
            raise _err(table.name, msg, **at, field=field)
        if isinstance(rec[field], list):
            prompt = _messages(rec, field, table.name, at, reply=False)
        else:
            prompt = _string(rec, field, table.name, at, blank_ok=True)
        if prompts:
            is_list = isinstance(prompts[0], list)
            _kind_check(is_list, isinstance(prompt, list), table.name, at, field)
        prompts.append(prompt)
        others.append({k: v for k, v in rec.items() if k != field})
    if not prompts:
        raise _err(table.name, "has no prompts")
    names = list(dict.fromkeys(k for rec in others for k in rec))
    return prompts, {name: [rec.get(name) for rec in others] for name in names}
