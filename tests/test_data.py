"""Tests for rlhf.data: record formats, one-line errors for bad files, and atomic writes."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.data import (
    JsonlWriter,
    PreferencePair,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_preferences,
    read_prompts,
    write_jsonl,
    write_preferences,
)
from rlhf.errors import InputError

SEED = {"prompt": "Explain gravity", "response_A": "A force.", "response_B": "Idk lol"}
COMMON = {"prompt": "Explain gravity", "chosen": "A force.", "rejected": "Idk lol"}


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def raises_input_error(fn, path: Path, line: int | None = None, field: str | None = None) -> str:
    """Call `fn(path)`, check it raises a one-line InputError naming file, line and field."""
    with pytest.raises(InputError) as info:
        fn(path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith(f"{path}:" if line is None else f"{path}:{line}: ")
    if field is not None:
        assert f"field '{field}'" in msg
    return msg


# --- reading preferences -----------------------------------------------------------------------


def test_reads_both_formats_per_record(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        jsonl({**SEED, "preference": "A"}, {**SEED, "preference": "B", "extra": [1]})
        + "\n   \n"
        + jsonl({**COMMON, "margin": 2}, {**COMMON, "prompt": "", "margin": None})
    )
    assert read_preferences(path) == [
        PreferencePair("Explain gravity", "A force.", "Idk lol"),
        PreferencePair("Explain gravity", "Idk lol", "A force."),
        PreferencePair("Explain gravity", "A force.", "Idk lol", margin=2.0),
        PreferencePair("", "A force.", "Idk lol"),
    ]


def test_reads_crlf_bom_and_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    rec = {"prompt": "a\u2028b", "chosen": "caf\u00e9 \u2029", "rejected": "x\ny"}
    line = json.dumps(rec, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (line + "\r\n" + line).encode())
    assert read_preferences(path) == [PreferencePair("a\u2028b", "caf\u00e9 \u2029", "x\ny")] * 2


def test_common_format_wins_when_a_record_has_both(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(jsonl({**SEED, **COMMON, "chosen": "c", "preference": "B"}))
    assert read_preferences(path) == [PreferencePair("Explain gravity", "c", "Idk lol")]


def test_round_trip_pairs(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("p", "good", "bad"),
        PreferencePair("", "caf\u00e9 \u2028", "b\n", margin=-1.5),
    ]
    path = tmp_path / "out" / "prefs.jsonl"
    write_preferences(path, pairs)
    assert read_preferences(path) == pairs
    assert "caf\u00e9" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert json.loads(path.read_text().splitlines()[0]) == {
        "prompt": "p",
        "chosen": "good",
        "rejected": "bad",
    }


def test_round_trip_seed_dicts_written_as_given(tmp_path: Path) -> None:
    records = [{**SEED, "preference": "B", "id": 7}, COMMON]
    path = tmp_path / "prefs.jsonl"
    write_preferences(path, records)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert read_preferences(path)[0] == PreferencePair("Explain gravity", "Idk lol", "A force.")


def test_write_rejects_a_bad_record_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text("old\n")
    bad = [COMMON, COMMON, {**COMMON, "rejected": ""}]
    raises_input_error(lambda p: write_preferences(p, bad), path, 3, "rejected")
    raises_input_error(lambda p: write_preferences(p, []), path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["prefs.jsonl"]
    with pytest.raises(TypeError):
        write_preferences(path, [("p", "a", "b")])  # type: ignore[list-item]


OK = jsonl(COMMON, COMMON)  # two good lines, so every bad one below is line 3

BAD_PREFERENCES = [
    # (third line, field, words the message must hold)
    ('{"prompt": "p", "chosen": "a" "rejected": "b"}', None, "not valid JSON: Expecting ','"),
    ("[1, 2]", None, "must be a JSON object {...}, got array [1, 2]"),
    ('"just a string"', None, "got string 'just a string'"),
    ("{}", "chosen", "missing, as is 'rejected' (the record's fields: none)"),
    (
        '{"q": "p", "good": "a", "bad": "b"}',
        "chosen",
        "(the record's fields: 'q', 'good', 'bad'); a record needs {[prompt, ]chosen, rejected[, margin]} or {prompt, response_A, response_B, preference}; other names: --prompt-field, --chosen-field, --rejected-field",
    ),
    (
        '{"prompt": "p", "chosen": "a"}',
        "rejected",
        "missing (the record's fields: 'prompt', 'chosen'); a record needs",
    ),
    ('{"prompt": "p", "response_A": "a", "response_B": "b"}', "preference", "missing"),
    ('{"response_A": "a", "response_B": "b", "preference": "A"}', "prompt", "missing"),
    ('{"prompt": "p", "response_A": "a", "preference": "A"}', "response_B", "missing"),
    ('{"prompt": "p", "text": "t"}', "chosen", "response_A, response_B, preference"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "prompt", "expected a string, got number 3"),
    ('{"prompt": "p", "chosen": 42, "rejected": "b"}', "chosen", "expected a string, got number"),
    ('{"prompt": "p", "chosen": "a", "rejected": null}', "rejected", "got null None"),
    ('{"prompt": "p", "chosen": ["a"], "rejected": "b"}', "chosen", "got array"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}', "chosen", "is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": " \\t\\n"}', "rejected", "is whitespace only"),
    ('{"prompt": "p", "response_A": " ", "response_B": "b", "preference": "A"}', "response_A", ""),
    ('{"prompt": "p", "response_A": "a", "response_B": "b", "preference": "a"}', "preference", ""),
    ('{"prompt": "p", "response_A": "a", "response_B": "b", "preference": 1}', "preference", ""),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "rejected", "are identical"),
    ('{"prompt": "p", "response_A": "s", "response_B": "s", "preference": "B"}', "response_B", ""),
    (
        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}',
        "margin",
        "expected a number",
    ),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}', "margin", "got boolean"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "margin", "must be finite"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}', "margin", "finite"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}', "margin", "finite"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 9' + "9" * 400 + "}", "margin", ""),
    ('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "prompt", "unpaired surrogate"),
    ("[" * 100_000, None, "nested too deeply"),
    ("1" * 5000, None, "not valid JSON"),
]


@pytest.mark.parametrize(("line", "field", "words"), BAD_PREFERENCES)
def test_bad_record_names_file_line_and_field(
    tmp_path: Path, line: str, field: str | None, words: str
) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(OK + line + "\n" + jsonl(COMMON))
    msg = raises_input_error(read_preferences, path, 3, field)
    assert words in msg
    assert len(msg) - len(str(path)) < 300  # long offending values are cut


def test_long_offending_value_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(jsonl({"prompt": "p", "chosen": ["x" * 1000], "rejected": "b"}))
    msg = raises_input_error(read_preferences, path, 1, "chosen")
    shown = msg.split("got array ")[1]
    assert len(shown) == 40 and shown == "['" + "x" * 35 + "..."


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(OK.encode() + b'{"prompt": "caf\xe9"}\n')
    msg = raises_input_error(read_preferences, path, 3)
    assert "not valid UTF-8: byte 0xe9 at position 16" in msg


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "does not exist"), (b"", "is empty"), (b"\n \r\n\n", "no records")],
)
def test_missing_or_empty_file(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "prefs.jsonl"
    if content is not None:
        path.write_bytes(content)
    assert words in raises_input_error(read_preferences, path)


def test_directory_and_odd_path_names(tmp_path: Path) -> None:
    assert "is a directory" in raises_input_error(read_preferences, tmp_path)
    if sys.platform != "win32":
        path = tmp_path / "a\nb.jsonl"
        path.write_text("")
        with pytest.raises(InputError) as info:
            read_preferences(path)
        assert "\n" not in str(info.value) and "a\\nb.jsonl: is empty" in str(info.value)


# --- fuzzing: bad content only ever raises InputError ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
strings = st.text(max_size=6) | st.sampled_from(["", " ", "x", "y"])
field_values = st.one_of(strings, strings, strings, strings, json_values)
record_like = (
    st.fixed_dictionaries(
        {"prompt": field_values, "chosen": field_values, "rejected": field_values},
        optional={"margin": st.none() | st.floats() | json_values},
    )
    | st.fixed_dictionaries(
        {"prompt": field_values, "response_A": field_values, "response_B": field_values},
        optional={"preference": st.sampled_from(["A", "B", "a", ""]) | json_values},
    )
    | st.dictionaries(st.sampled_from(["prompt", "chosen", "response_B", "x"]), field_values)
)
fuzz = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def only_input_errors(fn, path: Path):
    try:
        return fn(path)
    except InputError as e:
        assert "\n" not in str(e)
        return None


@fuzz
@given(data=st.binary(max_size=300))
def test_fuzz_bytes(tmp_path: Path, data: bytes) -> None:
    for name in ("prefs.jsonl", "prompts.txt", "prompts.json"):
        path = tmp_path / name
        path.write_bytes(data)
        result = only_input_errors(read_preferences, path)
        assert result is None or all(isinstance(p, PreferencePair) for p in result)
        result = only_input_errors(read_prompts, path)
        assert result is None or all(isinstance(p, str) for p in result)
        result = only_input_errors(read_jsonl, path)
        assert result is None or all(isinstance(r, dict) for r in result)


@fuzz
@given(values=st.lists(record_like | record_like | json_values, min_size=1, max_size=2))
def test_fuzz_json_lines(tmp_path: Path, values: list) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in values), encoding="utf-8")
    pairs = only_input_errors(read_preferences, path)
    if pairs is not None:  # whatever reads also writes and reads back the same
        write_preferences(tmp_path / "again.jsonl", pairs)
        assert read_preferences(tmp_path / "again.jsonl") == pairs
    only_input_errors(read_prompts, path)
    only_input_errors(read_jsonl, path)


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
pairs_strategy = st.builds(
    PreferencePair,
    prompt=texts,
    chosen=texts.filter(str.strip),
    rejected=texts.filter(str.strip),
    margin=st.none() | st.floats(allow_nan=False, allow_infinity=False),
).filter(lambda p: p.chosen != p.rejected)


@fuzz
@given(pairs=st.lists(pairs_strategy, min_size=1, max_size=4))
def test_round_trip_any_valid_pairs(tmp_path: Path, pairs: list[PreferencePair]) -> None:
    write_preferences(tmp_path / "prefs.jsonl", pairs)
    assert read_preferences(tmp_path / "prefs.jsonl") == pairs


# --- prompts -----------------------------------------------------------------------------------


def test_read_prompts_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfOnce upon\r\n\n   \n  indented  \nlast")
    assert read_prompts(path) == ["Once upon", "  indented  ", "last"]


def test_read_prompts_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prompts.JSONL"
    path.write_text(jsonl({"prompt": "a"}, {**SEED, "preference": "A"}, {"prompt": ""}))
    assert read_prompts(path) == ["a", "Explain gravity", ""]


@pytest.mark.parametrize(
    ("name", "content", "line", "field"),
    [
        ("p.jsonl", b'{"prompt": "a"}\n\n{"text": "b"}\n', 3, "prompt"),
        ("p.json", b'{"prompt": "a"}\n\n{"prompt": 1}\n', 3, "prompt"),
        ("p.jsonl", b'{"prompt": "a"}\n\n["b"]\n', 3, None),
        ("p.jsonl", b'{"prompt": "a"}\n\n{"prompt": \n', 3, None),
        ("p.txt", b"fine\n\n\xff\xfe\n", 3, None),
        ("p.txt", b"", None, None),
        ("p.txt", b"\n  \n", None, None),
        ("p.jsonl", b"\n", None, None),
    ],
)
def test_read_prompts_errors(
    tmp_path: Path, name: str, content: bytes, line: int | None, field: str | None
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    raises_input_error(read_prompts, path, line, field)


# --- generic JSONL -----------------------------------------------------------------------------


def test_read_jsonl_skips_a_truncated_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "objective/re')
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_bytes('{"step": 0}\n{"note": "caf\u00e9"}\n'.encode()[:-4])  # cut inside "é"
    assert read_jsonl(path) == [{"step": 0}]
    path.write_text('{"step": 0}\n{"step": 1}')  # complete, just no newline: kept
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')  # bad middle line: an error
    raises_input_error(read_jsonl, path, 2)
    path.write_text('{"step": 0}\n{"step": 1\n')  # ends with a newline: not a killed writer
    raises_input_error(read_jsonl, path, 2)
    path.write_text('{"step": 0}\n[1]')  # parses but is not an object
    raises_input_error(read_jsonl, path, 2)


def test_read_jsonl_empty(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    raises_input_error(read_jsonl, path)
    assert read_jsonl(path, allow_empty=True) == []
    path.write_text('{"step": 0')
    raises_input_error(read_jsonl, path)
    assert read_jsonl(path, allow_empty=True) == []


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"step": 0, "loss/policy": 0.5, "path": tmp_path}, {"text": "caf\u00e9\n"}]
    write_jsonl(tmp_path / "m.jsonl", rows)
    assert read_jsonl(tmp_path / "m.jsonl") == [{**rows[0], "path": str(tmp_path)}, rows[1]]


def test_jsonl_writer_flushes_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    with JsonlWriter(path) as writer:
        for step in range(3):
            writer.write({"step": step, "objective/kl": 0.1 * step, "note": "a\nb"})
            text = path.read_text()  # read by another handle before close: already on disk
            assert text.endswith("\n") and len(text.splitlines()) == step + 1
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    with JsonlWriter(path) as writer:  # appends by default
        writer.write({"step": 3})
    assert len(read_jsonl(path)) == 4
    with JsonlWriter(path, append=False) as writer:
        writer.write({"step": 0})
    assert read_jsonl(path) == [{"step": 0}]


def test_jsonl_writer_converts_tensor_scalars(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with JsonlWriter(tmp_path / "m.jsonl") as writer:
        writer.write({"loss": torch.tensor(0.5), "n": torch.tensor(3)})
        with pytest.raises(TypeError):
            writer.write({"x": object()})
        with pytest.raises(TypeError):
            writer.write([1, 2])  # type: ignore[arg-type]
    assert read_jsonl(tmp_path / "m.jsonl") == [{"loss": 0.5, "n": 3}]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ('{"step": 1, "lo', [{"step": 0}, {"step": 2}]),  # a killed writer's fragment is cut
        ('{"step": 1}', [{"step": 0}, {"step": 1}, {"step": 2}]),  # a whole row is kept
    ],
)
def test_jsonl_writer_repairs_a_partial_last_line(tmp_path: Path, tail: str, expected) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n' + tail)
    with JsonlWriter(path) as writer:
        writer.write({"step": 2})
    assert read_jsonl(path) == expected


# --- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_on_success(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "model.bin"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".model.bin.tmp-")
        tmp.write_bytes(b"new")  # any library that writes to a path
        assert not path.exists()
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["model.bin"]


def test_atomic_write_keeps_the_old_file_when_the_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            1 / 0  # noqa: B018
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_write_body_that_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x"):
            pass
    assert os.listdir(tmp_path) == []


def test_atomic_write_errors_are_input_errors(tmp_path: Path) -> None:
    raises_input_error(lambda p: atomic_write_text(p, "x"), tmp_path)  # a directory
    (tmp_path / "file").write_text("")
    raises_input_error(lambda p: atomic_write_text(p, "x"), tmp_path / "file" / "sub.txt")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_atomic_write_keeps_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"
    path.write_text("old")
    path.chmod(0o750)
    atomic_write_text(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "x\r\ny\n\u00e9")
    assert (tmp_path / "a.txt").read_bytes() == "x\r\ny\n\u00e9".encode()
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2], "p": Path("x")})
    text = (tmp_path / "c.json").read_text()
    assert text == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ],\n  "p": "x"\n}\n'
