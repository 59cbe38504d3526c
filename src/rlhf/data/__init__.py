"""Records, readers and validation, and writes that lose nothing (the bottom layer: no models).

`files` reads bytes, JSONL lines and JSON; `tables` recognises the formats (JSONL, JSON, Parquet,
`datasets` folders) and returns their records; `records` validates preference and prompt records
(standard, conversational, implicit-prompt and the seed's A/B form); `writing` replaces files
atomically and appends JSONL. Every reader turns bad content into an `InputError` with a one-line
message naming the file, the line (JSONL, 1-based) or row (tables, 0-based) and the field.
"""

from .files import read_jsonl
from .records import (
    Message,
    PreferencePair,
    read_preferences,
    read_prompt_records,
    read_prompts,
    write_preferences,
)
from .tables import FORMATS, read_table
from .writing import (
    JsonlWriter,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    write_jsonl,
)

__all__ = [
    "FORMATS",
    "JsonlWriter",
    "Message",
    "PreferencePair",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "read_jsonl",
    "read_preferences",
    "read_prompt_records",
    "read_prompts",
    "read_table",
    "write_jsonl",
    "write_preferences",
]
