"""The preference data people have: JSONL, JSON, Parquet and `datasets` folders; TRL's standard,
conversational and implicit-prompt forms; field names of one's own; one-line errors naming the
file, the line or row, and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf.cli import main
from rlhf.data import PreferencePair, read_preferences, read_prompts, write_preferences
from rlhf.errors import InputError

# A template simple enough to render by hand: each turn is "<|role|>\ncontent<|end|>\n".
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + TEMPLATE
)
STANDARD = {"prompt": "the plot", "chosen": "was great .", "rejected": "was dull ."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATION = {"prompt": [user("the plot")], "chosen": [bot("great")], "rejected": [bot("dull")]}


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- formats -----------------------------------------------------------------------------------


def test_every_format_reads_the_same_pairs(tmp_path: Path, capsys) -> None:
    from datasets import Dataset

    # (pyarrow takes a table's columns from the first row: both rows have a margin)
    rows = [{**STANDARD, "margin": None}, {**STANDARD, "chosen": "moved me .", "margin": 1.5}]
    expected = [
        PreferencePair("the plot", "was great .", "was dull ."),
        PreferencePair("the plot", "moved me .", "was dull .", 1.5),
    ]
    (tmp_path / "a.jsonl").write_text(jsonl(*rows))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text(jsonl(*rows))
    write_parquet(tmp_path / "a.parquet", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    # Other names are read by content: JSON (first character { or [) or Parquet's magic bytes.
    (tmp_path / "lines.txt").write_text(jsonl(*rows))
    (tmp_path / "array").write_text(json.dumps(rows))
    write_parquet(tmp_path / "parquet.data", rows)
    names = ["a.jsonl", "array.json", "lines.json", "a.parquet", "folder"]
    for name in [*names, "lines.txt", "array", "parquet.data"]:
        assert read_preferences(tmp_path / name) == expected, name
    assert capsys.readouterr().out == ""  # nothing to say about a plain Dataset


def test_datasets_dict_reads_train_and_says_so(tmp_path: Path, capsys) -> None:
    from datasets import Dataset, DatasetDict

    other = {**STANDARD, "prompt": "held out"}
    DatasetDict(
        {"test": Dataset.from_list([other]), "train": Dataset.from_list([STANDARD])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert [p.prompt for p in read_preferences(tmp_path / "dd")] == ["the plot"]
    assert (
        capsys.readouterr().out.strip()
        == f"{tmp_path / 'dd'}: reading its 'train' split (splits: test, train)"
    )
    # One split, whatever its name, is not ambiguous.
    DatasetDict({"validation": Dataset.from_list([other])}).save_to_disk(str(tmp_path / "one"))
    assert [p.prompt for p in read_preferences(tmp_path / "one")] == ["held out"]
    assert "'validation' split" in capsys.readouterr().out
    # Two splits and no train: refused, pointing at a split's folder.
    DatasetDict({"a": Dataset.from_list([other]), "b": Dataset.from_list([other])}).save_to_disk(
        str(tmp_path / "two")
    )
    msg = one_line_error(read_preferences, tmp_path / "two")
    assert "has splits 'a', 'b' and none is 'train'" in msg and str(tmp_path / "two" / "a") in msg
    # Rows of a split are named by the split's folder.
    DatasetDict(
        {"train": Dataset.from_list([STANDARD, {**STANDARD, "chosen": "  "}])}
    ).save_to_disk(str(tmp_path / "bad"))
    msg = one_line_error(read_preferences, tmp_path / "bad")
    assert msg.startswith(f"{tmp_path / 'bad' / 'train'}: row 1 (0-based): field 'chosen': ")


def test_parquet_named_jsonl_is_read_as_parquet(tmp_path: Path) -> None:
    # Issue 14: this used to say "not valid UTF-8 ... save the file as UTF-8".
    path = write_parquet(tmp_path / "prefs.jsonl", [STANDARD])
    assert read_preferences(path) == [PreferencePair(**STANDARD)]
    assert read_prompts(path) == ["the plot"]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("prefs.xlsx", b"PK\x03\x04"),
        ("prefs.txt", b"the plot was great\n"),
        ("prefs.jsonl.gz", b"\x1f\x8b\x08\x00"),
        ("prefs", b"prompt\tchosen\n"),
    ],
)
def test_unknown_format_names_the_formats_read(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    msg = one_line_error(read_preferences, path)
    assert msg.startswith(f"{path}: cannot read ")
    for fmt in (".jsonl", ".json", ".parquet", "save_to_disk"):
        assert fmt in msg
    assert "UTF-8" not in msg and "not valid JSON" not in msg


def test_preferences_from_csv_and_tsv(tmp_path: Path) -> None:
    csv = tmp_path / "prefs.csv"
    csv.write_text(
        'prompt,chosen,rejected,margin\nthe plot,"was great, really",was dull,1.5\n\n'
        '"the film\nitself",moved me,bored me,\n'
    )
    first, second = read_preferences(csv)
    assert (first.prompt, first.chosen, first.margin) == ("the plot", "was great, really", 1.5)
    assert (second.prompt, second.margin, second.source) == ("the film\nitself", None, f"{csv}:5")
    tsv = tmp_path / "prefs.tsv"
    tsv.write_text("q\tgood\tbad\nthe plot\twas great\twas dull\n")
    (pair,) = read_preferences(tsv, prompt_field="q", chosen_field="good", rejected_field="bad")
    assert pair.chosen == "was great"
    for text, words in [
        ("prompt,chosen,rejected\nthe plot,great\n", ":2: has 2 cells where the header names 3 columns"),
        ("prompt,chosen,rejected,margin\np,a,b,lots\n", ":2: field 'margin': expected a number, got string 'lots'"),
        ("prompt,prompt,rejected\n", ":1: names column 'prompt' twice in its header"),
        ("", ": is empty; expected a header row naming the columns"),
        ("q,good,bad\np,a,b\n", ": has no column 'chosen' (its columns: q, good, bad)"),
    ]:  # fmt: skip
        csv.write_text(text)
        assert one_line_error(read_preferences, csv).startswith(f"{csv}{words}")


def test_prompts_from_a_csv_and_text_is_still_text(tmp_path: Path) -> None:
    csv = tmp_path / "prompts.csv"
    csv.write_text('prompt,id\nthe plot,1\n"the film, which was long",2\n')
    assert read_prompts(csv) == ["the plot", "the film, which was long"]
    xlsx = tmp_path / "prompts.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    msg = one_line_error(read_prompts, xlsx)
    assert msg.startswith(f"{xlsx}: cannot read .xlsx files as prompts; ")
    assert ".csv or .tsv" in msg and "plain text, one prompt per line" in msg
    text = tmp_path / "prompts.txt"
    text.write_text('{"looks": "like json"}\nthe plot\n')
    assert read_prompts(text) == ['{"looks": "like json"}', "the plot"]


def test_a_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    msg = one_line_error(read_preferences, tmp_path)
    assert "is a directory, not a dataset saved with datasets' save_to_disk" in msg


def test_json_holding_one_pretty_printed_object(tmp_path: Path) -> None:
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(STANDARD, indent=2))
    assert "holds one JSON object over several lines" in one_line_error(read_preferences, path)
    path.write_text('[\n  {"prompt": "p",\n   "chosen": "a" "rejected": "b"}\n]')
    msg = one_line_error(read_preferences, path)
    assert msg.startswith(f"{path}:3: not valid JSON")  # the line inside the document


# --- forms -------------------------------------------------------------------------------------


def test_conversational_records(tmp_path: Path) -> None:
    system = {"role": "system", "content": "be kind"}
    rec = {
        "prompt": [system, user("the plot")],
        "chosen": [{**bot("great"), "name": None}],  # extra keys (datasets adds them) are dropped
        "rejected": [bot("dull")],
    }
    path = write_parquet(tmp_path / "conv.parquet", [rec])
    (pair,) = read_preferences(path)
    assert pair.is_conversation
    assert pair.prompt == [system, user("the plot")]
    assert (pair.chosen, pair.rejected) == ([bot("great")], [bot("dull")])
    # Written back as JSONL, it reads the same.
    write_preferences(tmp_path / "back.jsonl", [pair])
    assert read_preferences(tmp_path / "back.jsonl") == [pair]


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt", "chosen_rest", "rejected_rest"),
    [
        # Worked by hand: the shared start is cut at its last whitespace, which the
        # responses keep, so no word is split ("b" is shared by "blue" and "bright").
        ("The sky is blue", "The sky is bright", "The sky is", " blue", " bright"),
        ("Q: 2+2? A: 4", "Q: 2+2? A: 5", "Q: 2+2? A:", " 4", " 5"),
        ("Yes", "No", "", "Yes", "No"),
        ("The answer", "The answer is 4", "The", " answer", " answer is 4"),
        ("Q:\n\nA", "Q:\n\nB", "Q:\n", "\nA", "\nB"),
    ],
)
def test_implicit_prompt_texts(
    tmp_path: Path, capsys, chosen, rejected, prompt, chosen_rest, rejected_rest
) -> None:
    path = tmp_path / "implicit.jsonl"
    path.write_text(jsonl({"chosen": chosen, "rejected": rejected}))
    assert read_preferences(path) == [PreferencePair(prompt, chosen_rest, rejected_rest)]
    assert "implicit prompt" in capsys.readouterr().out


def test_implicit_prompt_conversations(tmp_path: Path) -> None:
    history = [user("hi"), bot("hello"), user("the plot?")]
    path = tmp_path / "implicit.json"
    path.write_text(
        json.dumps([{"chosen": history + [bot("great")], "rejected": history + [bot("dull")]}])
    )
    assert read_preferences(path) == [PreferencePair(history, [bot("great")], [bot("dull")])]


def test_field_names_of_ones_own(tmp_path: Path) -> None:
    rows = [{"question": "the plot", "good": "was great .", "bad": "was dull .", "prompt": 3}]
    path = write_parquet(tmp_path / "mine.parquet", rows)
    got = read_preferences(path, prompt_field="question", chosen_field="good", rejected_field="bad")
    assert got == [PreferencePair("the plot", "was great .", "was dull .")]
    # With the standard names the columns are missing: said once, with the columns there are.
    msg = one_line_error(read_preferences, path)
    assert msg.startswith(
        f"{path}: has no column 'chosen' (its columns: question, good, bad, prompt)"
    )
    assert "--chosen-field" in msg
    prompts = write_parquet(tmp_path / "p.parquet", [{"question": [user("hi")]}])
    assert read_prompts(prompts, field="question") == [[user("hi")]]
    assert "has no column 'prompt'" in one_line_error(read_prompts, prompts)


# --- bad records -------------------------------------------------------------------------------

GOOD_CONV = CONVERSATION
BAD_ROWS = [
    # (the bad record, placed second; field; words)
    ({**STANDARD, "chosen": None}, "chosen", "expected a string, got null"),
    ({**STANDARD, "rejected": 3}, "rejected", "expected a string, got number 3"),
    ({**STANDARD, "rejected": "was great ."}, "rejected", "are identical"),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "chosen", "is whitespace only"),
    ({**GOOD_CONV, "chosen": [{"content": "x"}]}, "chosen[0].role", "missing; a message is"),
    ({**GOOD_CONV, "rejected": [{"role": "assistant"}]}, "rejected[0].content", "missing"),
    ({**GOOD_CONV, "rejected": [bot("ok"), "hi"]}, "rejected[1]", "expected a message"),
    ({**GOOD_CONV, "chosen": [{"role": "", "content": "x"}]}, "chosen[0].role", "needs a role"),
    (
        {**GOOD_CONV, "chosen": [{"role": "assistant", "content": 5}]},
        "chosen[0].content",
        "got number 5",
    ),
    ({**GOOD_CONV, "chosen": [bot("")]}, "chosen[0].content", "is empty"),
    ({**GOOD_CONV, "rejected": []}, "rejected", "is an empty list"),
    ({**GOOD_CONV, "rejected": "dull"}, "rejected", "expected a list of messages, got string"),
    ({**GOOD_CONV, "rejected": [bot("great")]}, "rejected", "are identical"),
    (
        {"chosen": [user("a"), bot("x")], "rejected": [user("b"), bot("y")]},
        "rejected",
        "differs from 'chosen' before its last message",
    ),
    ({"chosen": [bot("x")], "rejected": [bot("y")]}, "chosen", "has 1 message"),
    ({"chosen": "abc ", "rejected": "abc d"}, "chosen", "has no text after the start it shares"),
]


@pytest.mark.parametrize(("bad", "field", "words"), BAD_ROWS)
def test_bad_row_names_file_row_and_field(
    tmp_path: Path, bad: dict, field: str, words: str
) -> None:
    good = GOOD_CONV if any(isinstance(v, list) for v in bad.values()) else STANDARD
    # JSONL names the 1-based line; a JSON array and Parquet the 0-based row.
    (tmp_path / "p.jsonl").write_text(jsonl(good, bad))
    (tmp_path / "p.json").write_text(json.dumps([good, bad]))
    for path, where in (
        (tmp_path / "p.jsonl", ":2: "),
        (tmp_path / "p.json", ": row 1 (0-based): "),
    ):
        msg = one_line_error(read_preferences, path)
        assert msg.startswith(f"{path}{where}field '{field}': "), msg
        assert words in msg, msg


def test_bad_parquet_rows_and_files(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [STANDARD, STANDARD, {**STANDARD, "chosen": None}])
    msg = one_line_error(read_preferences, path)
    assert msg == f"{path}: row 2 (0-based): field 'chosen': expected a string, got null None"
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt": pa.array([], pa.string()),
                "chosen": pa.array([], pa.string()),
                "rejected": pa.array([], pa.string()),
            }
        ),
        empty,
    )
    assert one_line_error(read_preferences, empty) == f"{empty}: has no records"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not really parquet")
    assert one_line_error(read_preferences, broken).startswith(
        f"{broken}: cannot be read as Parquet: "
    )


def test_text_and_conversations_do_not_mix(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl(STANDARD, CONVERSATION))
    msg = one_line_error(read_preferences, path)
    assert msg.startswith(f"{path}:2: field 'chosen': is conversations")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(jsonl({"prompt": [user("hi")]}, {"prompt": "hi"}))
    assert one_line_error(read_prompts, prompts).startswith(f"{prompts}:2: field 'prompt': is text")


# --- rendering with the chat template ----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = TEMPLATE
    return tok


def test_render_conversation_pairs_by_hand(chat_tokenizer) -> None:
    from rlhf.models.generation import render_conversation_pairs, render_prompt_conversations

    # The responses share their first letter, which stays theirs: the prompt ends where the
    # generation prompt does. The template's BOS is dropped: the tokenizer adds its own.
    pair = PreferencePair([user("the plot")], [bot("great")], [bot("good")], 0.5, "f.jsonl:1")
    expected = PreferencePair(
        "<|user|>\nthe plot<|end|>\n<|assistant|>\n", "great<|end|>\n", "good<|end|>\n", 0.5
    )
    assert render_conversation_pairs(chat_tokenizer, [pair], "f.jsonl") == [expected]
    assert render_prompt_conversations(chat_tokenizer, [[user("hi")]], "p.jsonl") == [
        "<|user|>\nhi<|end|>\n<|assistant|>\n"
    ]
    # A template whose generation prompt differs from what it writes before a reply (as
    # some reasoning models add "<think>"): the prompt is the part both share.
    chat_tokenizer.chat_template = TEMPLATE.replace(
        "<|assistant|>\n{% endif %}", "<|assistant|>\n<think>{% endif %}"
    )
    try:
        assert render_conversation_pairs(chat_tokenizer, [pair], "f.jsonl") == [expected]
    finally:
        chat_tokenizer.chat_template = TEMPLATE


def test_a_turn_closed_by_eos_is_trained_on_what_ppo_scores(chat_tokenizer) -> None:
    # Templates that close a turn with the tokenizer's EOS (as Qwen's <|im_end|>): the reward
    # model must see reply + EOS, as PPO scores a reply sampled up to its EOS, not reply + EOS +
    # newline + a second EOS.
    from rlhf.models.generation import render_conversation_pairs
    from rlhf.reward.loss import encode_texts

    pair = PreferencePair([user("the plot")], [bot("great")], [bot("good")], None, "f.jsonl:1")
    chat_tokenizer.chat_template = TEMPLATE.replace("<|end|>", "{{ eos_token }}")
    try:
        [got] = render_conversation_pairs(chat_tokenizer, [pair], "f.jsonl")
    finally:
        chat_tokenizer.chat_template = TEMPLATE
    assert (got.chosen, got.rejected) == ("great", "good")
    [row], _ = encode_texts(chat_tokenizer, [got.prompt], [got.chosen], 1000)
    sampled = chat_tokenizer(got.prompt + "great")["input_ids"] + [chat_tokenizer.eos_token_id]
    assert row == sampled


def test_render_errors_are_one_line(chat_tokenizer, tiny_model_dir) -> None:
    from rlhf.models.generation import render_conversation_pairs
    from rlhf.models.loading import load_tokenizer

    pair = PreferencePair(
        [{"role": "system", "content": "x"}], [bot("a")], [bot("b")], None, "f.jsonl:4"
    )
    plain = load_tokenizer(tiny_model_dir)
    msg = one_line_error(render_conversation_pairs, plain, [pair], "f.jsonl", "the tokenizer in m")
    assert msg.startswith("f.jsonl: holds conversations") and "the tokenizer in m has none" in msg
    strict = load_tokenizer(tiny_model_dir)
    strict.chat_template = NO_SYSTEM
    msg = one_line_error(render_conversation_pairs, strict, [pair], "f.jsonl")
    assert msg == "f.jsonl:4: the chat template refused the conversation: System role not supported"


# --- end to end through the CLI ----------------------------------------------------------------

SMALL = [
    "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--eval-fraction", "0.25",
    "--normalise-samples", "8", "--response-tokens", "4", "--device", "cpu",
]  # fmt: skip
GOOD = ["superb and moving .", "great fun .", "i loved it ."]
BAD = ["dull and weak .", "a waste .", "it broke ."]
PROMPTS = ["the acting was", "the plot was", "this phone is", "i watched this film and"]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    import shutil

    from rlhf.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, path)
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_train_reward_on_conversational_parquet(tmp_path, chat_model_dir, monkeypatch, capsys):
    import rlhf.reward.train as train

    rows = [
        {"prompt": [user(p)], "chosen": [bot(g)], "rejected": [bot(b)]}
        for p in PROMPTS for g, b in zip(GOOD, BAD)
    ]  # fmt: skip
    data = write_parquet(tmp_path / "conv.parquet", rows)
    seen = []
    real = train.encode_texts
    monkeypatch.setattr(
        train, "encode_texts", lambda tok, p, r, n: seen.append((p, r)) or real(tok, p, r, n)
    )
    out = tmp_path / "rm"
    assert (
        main(
            [
                "train-reward",
                "--data",
                str(data),
                "--model",
                str(chat_model_dir),
                "--out",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    assert "held-out accuracy" in capsys.readouterr().out
    assert json.loads((out / "reward_eval.json").read_text())["n_train_pairs"] == 9
    # What the model was trained on is the template's text: prompt with the generation prompt,
    # responses as the assistant turn the template writes.
    prompts, responses = seen[0]
    assert all(
        p.startswith("<|user|>\n") and p.endswith("<|end|>\n<|assistant|>\n") for p in prompts
    )
    assert all(r.endswith("<|end|>\n") and r.removesuffix("<|end|>\n") in GOOD for r in responses)


def test_train_reward_on_a_datasets_folder_with_own_field_names(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from datasets import Dataset, DatasetDict

    import rlhf.reward.train as train

    rows = [{"q": p, "good": g, "bad": b} for p in PROMPTS for g, b in zip(GOOD, BAD)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    seen = []
    real = train.encode_texts
    monkeypatch.setattr(
        train, "encode_texts", lambda tok, p, r, n: seen.append(p) or real(tok, p, r, n)
    )
    out = tmp_path / "rm"
    args = ["train-reward", "--data", str(tmp_path / "dd"), "--model", str(tiny_model_dir)]
    args += ["--prompt-field", "q", "--chosen-field", "good", "--rejected-field", "bad"]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "reading its 'train' split" in printed and "implicit prompt" not in printed
    assert seen and all(set(prompts) <= set(PROMPTS) for prompts in seen)
    config = json.loads((out / "config.json").read_text())
    assert (config["prompt_field"], config["chosen_field"], config["rejected_field"]) == (
        "q",
        "good",
        "bad",
    )
    assert (out / "reward_model").is_dir()


@pytest.mark.parametrize("case", ["bad-row", "csv", "no-template", "builtin-model", "same-fields"])
def test_train_reward_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, case):
    out = tmp_path / "rm"
    out.mkdir()
    (out / "keep.txt").write_text("existing output")
    model = ["--model", str(tiny_model_dir)]
    extra = []
    if case == "bad-row":
        data = write_parquet(tmp_path / "p.parquet", [STANDARD, {**STANDARD, "rejected": None}])
        words = f"{data}: row 1 (0-based): field 'rejected': expected a string, got null"
    elif case == "csv":
        data = tmp_path / "p.csv"
        data.write_text("prompt,chosen,rejected\nthe plot,great,dull\nthe film,good,\n")
        words = f"{data}:3: field 'rejected': is empty"
    elif case in ("no-template", "builtin-model"):
        data = write_parquet(
            tmp_path / "c.parquet", [CONVERSATION, {**CONVERSATION, "chosen": [bot("ok")]}]
        )
        words = "holds conversations (lists of messages)"
        model = model if case == "no-template" else []
    else:
        data = tmp_path / "p.jsonl"
        data.write_text(jsonl(STANDARD, STANDARD))
        extra = ["--chosen-field", "rejected"]
        words = "--prompt-field, --chosen-field and --rejected-field must be three different names"
    assert (
        main(["train-reward", "--data", str(data), *model, "--out", str(out), *extra, *SMALL]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlhf train-reward: error: ") and words in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "existing output"


def test_ppo_reads_conversational_prompts(tmp_path, chat_model_dir, tiny_tokenizer, capsys):
    from conftest import make_tiny_lm
    from rlhf.models.reward_model import RewardModel

    rm = tmp_path / "rm"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(rm)
    prompts = write_parquet(tmp_path / "prompts.parquet", [{"q": [user(p)]} for p in PROMPTS])
    run = tmp_path / "run"
    args = [
        "ppo",
        "--model",
        str(chat_model_dir),
        "--reward-model",
        str(rm),
        "--prompts",
        str(prompts),
    ]
    args += ["--prompt-field", "q", "--out", str(run), "--steps", "1", "--batch-size", "4"]
    args += [
        "--minibatch-size",
        "2",
        "--response-tokens",
        "4",
        "--ppo-epochs",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    capsys.readouterr()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    rendered = {f"<|user|>\n{p}<|end|>\n<|assistant|>\n" for p in PROMPTS}
    assert samples and all(s["prompt"] in rendered for s in samples)
