"""Supervised fine-tuning records: the four forms TRL's SFTTrainer takes, validated.

  text                      {"text": str}: every token is trained
  prompt-completion         {"prompt": str, "completion": str}: the completion's tokens are
  conversational messages   {"messages": [message, ...]}: the assistant turns' tokens are
  conversational prompt-    {"prompt": [message, ...], "completion": [message, ...]}: the
    completion              completion's turns are
Messages are {"role": str, "content": str}. Extra keys are ignored; `text_field=`,
`prompt_field=`, `completion_field=` and `messages_field=` read other names. A file holds one
form. Reading is from any format `read_table` reads (JSONL, JSON, Parquet, a `datasets` folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .files import _err, _got, _object
from .records import Message, _check_columns, _fields_of, _messages, _string
from .tables import read_table, where

FORMS = ("text", "prompt-completion", "messages", "conversational prompt-completion")


class SFTFields(NamedTuple):
    """The names of an SFT record's fields (`--text-field` and the like)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class SFTExample:
    """One example to imitate.

    Text forms: `prompt` and `completion` are strings (the text form has an empty prompt); the
    completion is what the loss is on. Conversations: `messages` is the whole conversation and
    `trained` the indices of the turns the loss is on (the assistant turns, or the completion's
    turns). `source` says where the record was read, for later messages about it.
    """

    form: str
    prompt: str = ""
    completion: str = ""
    messages: tuple[Message, ...] = ()
    trained: tuple[int, ...] = ()
    source: str = field(default="", compare=False, repr=False)

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages)


def _form_of(rec: dict, f: SFTFields) -> str | None:
    if f.messages in rec:
        return "messages"
    if f.prompt in rec and f.completion in rec:
        prompt_is_list = isinstance(rec[f.prompt], list)
        return "conversational prompt-completion" if prompt_is_list else "prompt-completion"
    if f.text in rec:
        return "text"
    return None


def _expected(f: SFTFields) -> str:
    return (
        f"an SFT record needs {{{f.text}}}, {{{f.prompt}, {f.completion}}} or {{{f.messages}}} "
        "(rename yours with --text-field, --prompt-field, --completion-field, --messages-field)"
    )


def _missing(rec: dict, f: SFTFields) -> str:
    """What the record lacks, and the fields it has (a renamed field is the usual cause)."""
    have = _fields_of(rec)
    if f.prompt in rec:
        return f"field '{f.completion}': missing {have}; {_expected(f)}"
    return (f"no '{f.text}', '{f.prompt}'/'{f.completion}' or '{f.messages}' field {have}; "
            f"{_expected(f)}")  # fmt: skip


def _to_example(value, path, at: dict, f: SFTFields, completion_only: bool) -> SFTExample:
    rec = _object(path, value, **at)
    form = _form_of(rec, f)
    src = where(path, at)
    if form is None:
        raise _err(path, _missing(rec, f), **at)
    if form == "text":
        return SFTExample(form, completion=_string(rec, f.text, path, at), source=src)
    if form == "prompt-completion":
        prompt = _string(rec, f.prompt, path, at, blank_ok=True)
        if isinstance(rec[f.completion], list):
            raise _err(path, f"is a list of messages but '{f.prompt}' is text; give both as text "
                       "or both as messages", **at, field=f.completion)  # fmt: skip
        return SFTExample(form, prompt, _string(rec, f.completion, path, at), source=src)
    if form == "messages":
        messages = _messages(rec, f.messages, path, at, reply=False)
        trained = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if not trained and completion_only:
            roles = ", ".join(sorted({m["role"] for m in messages}))
            msg = (f"has no assistant turn to learn from (roles: {roles}); the loss is on the "
                   "assistant's turns (or use --no-completion-only-loss)")  # fmt: skip
            raise _err(path, msg, **at, field=f.messages)
        return SFTExample(form, messages=tuple(messages), trained=trained, source=src)
    prompt = _messages(rec, f.prompt, path, at, reply=False)
    if not isinstance(rec[f.completion], list):
        msg = f"expected a list of messages like '{f.prompt}', got {_got(rec[f.completion])}"
        raise _err(path, msg, **at, field=f.completion)
    completion = _messages(rec, f.completion, path, at, reply=True)
    trained = tuple(range(len(prompt), len(prompt) + len(completion)))
    return SFTExample(form, messages=tuple(prompt + completion), trained=trained, source=src)


def read_sft_examples(
    path: str | Path,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    completion_only: bool = True,
) -> list[SFTExample]:
    """Read SFT records in one of the module docstring's forms. With `completion_only` (the
    default), a conversation with no assistant turn is refused: it would train nothing."""
    f = SFTFields(text_field, prompt_field, completion_field, messages_field)
    table = read_table(path, "SFT data")
    _check_columns(table, [(f.messages,), (f.prompt, f.completion), (f.text,)], _expected(f))
    examples: list[SFTExample] = []
    for at, value in table.records:
        example = _to_example(value, table.name, at, f, completion_only)
        if examples and example.form != examples[0].form:
            msg = (f"is a {example.form} record but the records before are "
                   f"{examples[0].form}; a file holds one form")  # fmt: skip
            raise _err(table.name, msg, **at)
        examples.append(example)
    if not examples:
        raise _err(table.name, "has no records")
    return examples
