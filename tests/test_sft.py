"""`rlhf sft` on a tiny model: the record forms, which tokens carry the loss, the loss against a
slow reference, micro-batches that change nothing, LoRA, and a pipeline that starts from its
output (SFT -> reward model -> PPO).

The examples are synthetic and learnable: each prompt "<subject> was" is followed by "great
<ending>", so held-out examples test the same habit on combinations not trained on.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest
import torch

from rlhf.cli import main
from rlhf.data.sft_records import read_sft_examples
from rlhf.errors import InputError
from rlhf.sft.config import SFTConfig
from rlhf.sft.train import encode_conversation, encode_text, token_losses, train_sft
from test_data_formats import TEMPLATE
from test_dpo import ENDINGS, SUBJECTS, _write_pairs


def _write_examples(path) -> None:
    with open(path, "w") as f:
        for subject, ending in itertools.product(SUBJECTS, ENDINGS):
            f.write(
                json.dumps({"prompt": f"{subject} was", "completion": f"great {ending}"}) + "\n"
            )


def _config(tmp_path, model_dir, **changes) -> SFTConfig:
    data = tmp_path / "sft.jsonl"
    _write_examples(data)
    fields = dict(
        out=str(tmp_path / "sft"), data=str(data), model=str(model_dir), epochs=6, batch_size=8,
        lr=1e-2, eval_fraction=0.25, sample_prompts=4, sample_tokens=8,
    )  # fmt: skip
    return SFTConfig(**(fields | changes))


def _chat_model(tmp_path, tiny_model_dir):
    from rlhf.models.loading import load_tokenizer

    model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, model)
    tok = load_tokenizer(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    return model, tok


def _marked(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_a_completion_carries_the_loss_and_ends_in_eos(tiny_tokenizer) -> None:
    ids, mask = encode_text(tiny_tokenizer, "the phone was", "great and it works well .", True)
    assert ids[-1] == tiny_tokenizer.eos_token_id and mask[-1] == 1
    assert _marked(tiny_tokenizer, ids, mask) == " great and it works well .<|endoftext|>"
    unmarked = [t for t, m in zip(ids, mask) if not m]
    assert tiny_tokenizer.decode(unmarked, skip_special_tokens=True) == "the phone was"
    # Every token but the first (which nothing predicts) without completion-only loss; a text
    # record (empty prompt) is the same.
    _, every = encode_text(tiny_tokenizer, "the phone was", "great .", False)
    _, text = encode_text(tiny_tokenizer, "", "the phone was great .", True)
    assert every[0] == 0 and all(every[1:]) and text == every


def test_only_the_assistant_turns_carry_the_loss(tiny_tokenizer) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "the plot"},
        {"role": "assistant", "content": "was moving ."},
        {"role": "user", "content": "the phone"},
        {"role": "assistant", "content": "is great ."},
    ]
    ids, mask = encode_conversation(tok, messages, (2, 4), True, "x")
    assert _marked(tok, ids, mask) == "was moving .<|end|>\nis great .<|end|>\n"
    unmarked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert unmarked == (
        "<|endoftext|><|system|>\nbe kind<|end|>\n<|user|>\nthe plot<|end|>\n<|assistant|>\n"
        "<|user|>\nthe phone<|end|>\n<|assistant|>\n"
    )
    # The turns a conversational prompt-completion record names (here only the last).
    ids, mask = encode_conversation(tok, messages, (4,), True, "x")
    assert _marked(tok, ids, mask) == "is great .<|end|>\n"


def test_the_four_forms_are_read_and_bad_records_named(tmp_path) -> None:
    def read(records, **kw):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return read_sft_examples(path, **kw)

    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert read([{"text": "a b"}])[0].form == "text"
    assert read([{"prompt": "a", "completion": "b"}])[0].completion == "b"
    (conv,) = read([{"messages": [user, bot, user, bot]}])
    assert conv.trained == (1, 3)
    (pc,) = read([{"prompt": [user], "completion": [bot]}])
    assert pc.form == "conversational prompt-completion" and pc.trained == (1,)
    assert read([{"q": "a", "a": "b"}], prompt_field="q", completion_field="a")[0].prompt == "a"
    path = tmp_path / "d.jsonl"
    cases = [
        (
            [{"instruction": "a", "output": "b"}],
            "d.jsonl:1: no 'text', 'prompt'/'completion' or "
            "'messages' field (the record's fields: 'instruction', 'output'); an SFT record needs "
            "{text}, {prompt, completion} or {messages} (rename yours with --text-field, "
            "--prompt-field, --completion-field, --messages-field)",
        ),
        (
            [{"prompt": "a", "answer": "b"}],
            "d.jsonl:1: field 'completion': missing (the record's fields: 'prompt', 'answer')",
        ),
        (
            [{"text": "a"}, {"prompt": "a", "completion": "b"}],
            "d.jsonl:2: is a prompt-completion "
            "record but the records before are text; a file holds one form",
        ),
        (
            [{"messages": [user]}],
            "d.jsonl:1: field 'messages': has no assistant turn to learn from (roles: user)",
        ),
        (
            [{"prompt": "a", "completion": [bot]}],
            "d.jsonl:1: field 'completion': is a list of messages but 'prompt' is text",
        ),
        ([{"prompt": "a", "completion": " "}], "d.jsonl:1: field 'completion': is whitespace only"),
    ]
    for records, message in cases:
        with pytest.raises(InputError) as info:
            read(records)
        assert str(info.value).startswith(f"{path.parent}/{message}"), str(info.value)
    # Trained on every token, a conversation with no assistant turn is usable.
    assert read([{"messages": [user]}], completion_only=False)[0].trained == ()


def test_token_losses_match_a_row_by_row_reference(tiny_tokenizer, tiny_lm) -> None:
    rows = [
        encode_text(tiny_tokenizer, "the phone was", "great .", True),
        encode_text(tiny_tokenizer, "the plot", "was dull and the ending felt weak .", True),
        encode_text(tiny_tokenizer, "", "i want a refund .", False),
    ]
    with torch.no_grad():
        nll, right = token_losses(tiny_lm, rows, tiny_tokenizer.pad_token_id, None)
        by_hand, hits = 0.0, 0
        for ids, mask in rows:  # one unpadded row at a time
            logits = tiny_lm(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            logp = torch.log_softmax(logits, -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    by_hand -= logp[t - 1, ids[t]].item()
                    hits += int(logits[t - 1].argmax().item() == ids[t])
    assert nll.item() == pytest.approx(by_hand, rel=1e-5)
    assert right.item() == hits


def test_sft_learns_and_micro_batches_change_nothing(tmp_path, tiny_model_dir) -> None:
    whole = train_sft(_config(tmp_path, tiny_model_dir, out=str(tmp_path / "a")), progress=False)
    assert whole["after"]["loss"] < 0.7 * whole["before"]["loss"]
    split = train_sft(
        _config(tmp_path, tiny_model_dir, out=str(tmp_path / "b"), micro_batch_size=3),
        progress=False,
    )
    assert split["after"]["loss"] == pytest.approx(whole["after"]["loss"], rel=1e-4)
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("a", "b")
    ]
    assert len(rows[0]) == len(rows[1]) > 5
    for r0, r1 in zip(*rows):
        assert r0.keys() == r1.keys()
        for key in r0:
            if key not in ("time", "step"):
                assert r0[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    # The output is a plain model folder with different weights, and samples of held-out prompts.
    from safetensors.torch import load_file

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "a" / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].endswith(" was") for s in samples)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["lr"] == 1e-2 and saved["max_length"] == 128


def test_lora_sft_writes_the_adapter_and_a_merged_model(tmp_path, tiny_model_dir) -> None:
    from rlhf.models.loading import load_causal_lm

    cfg = _config(tmp_path, tiny_model_dir, lora_r=4, lr=None, epochs=1)
    assert cfg.resolved_lr() == 2e-4
    result = train_sft(cfg, progress=False)
    out = tmp_path / "sft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "model" / "adapter_config.json").exists()
    merged, base = load_causal_lm(out / "model"), load_causal_lm(tiny_model_dir)
    changed = [
        n for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters())
        if not torch.equal(a, b)
    ]  # fmt: skip
    assert changed and result["lr"] == 2e-4


def test_conversations_train_the_assistant_turns(tmp_path, tiny_model_dir) -> None:
    model, _ = _chat_model(tmp_path, tiny_model_dir)
    data = tmp_path / "chats.jsonl"
    with open(data, "w") as f:
        for subject, ending in itertools.product(SUBJECTS, ENDINGS):
            messages = [{"role": "user", "content": f"{subject} was"},
                        {"role": "assistant", "content": f"great {ending}"}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
    result = train_sft(_config(tmp_path, model, data=str(data)), progress=False)
    assert result["form"] == "messages"
    assert result["after"]["loss"] < result["before"]["loss"]
    samples = [json.loads(x) for x in (tmp_path / "sft" / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].endswith("<|assistant|>\n") for s in samples)


def test_sft_output_trains_a_reward_model_and_a_ppo_policy(
    tmp_path, tiny_model_dir, capsys
) -> None:
    data = tmp_path / "sft.jsonl"
    _write_examples(data)
    sft = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(sft),
                 "--lr", "3e-3", "--epochs", "1", "--sample-tokens", "8"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"model:   {sft / 'model'} (give it to train-reward, ppo or dpo as --model)" in printed
    prefs = tmp_path / "prefs.jsonl"
    _write_pairs(prefs)
    rm = tmp_path / "rm"
    assert main(["train-reward", "--model", str(sft / "model"), "--data", str(prefs),
                 "--out", str(rm), "--epochs", "1", "--normalise-samples", "0"]) == 0  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{s} was" for s in SUBJECTS) + "\n")
    ppo = tmp_path / "ppo"
    assert main(["ppo", "--model", str(sft / "model"), "--reward-model", str(rm / "reward_model"),
                 "--prompts", str(prompts), "--out", str(ppo), "--steps", "2", "--batch-size", "8",
                 "--minibatch-size", "4", "--response-tokens", "6"]) == 0  # fmt: skip
    assert len((ppo / "metrics.jsonl").read_text().splitlines()) == 2
    ref = json.loads((ppo / "config.json").read_text())
    assert ref["model"] == str(sft / "model")


def test_sft_refuses_bad_input_in_one_line(tmp_path, tiny_model_dir, capsys) -> None:
    data = tmp_path / "sft.jsonl"
    _write_examples(data)
    out = tmp_path / "o"
    cases = [
        (["sft", "--out", str(out)], "rlhf sft: error: rlhf sft needs --data FILE"),
        (
            ["sft", "--data", str(data), "--model", str(tmp_path / "nope"), "--out", str(out)],
            f"rlhf sft: error: {tmp_path / 'nope'}: model folder does not exist",
        ),
        (
            [
                "sft",
                "--data",
                str(data),
                "--model",
                str(tiny_model_dir),
                "--max-length",
                "4096",
                "--out",
                str(out),
            ],
            "rlhf sft: error: --max-length 4096 exceeds the 128 positions",
        ),
        (
            ["sft", "--data", str(data), "--text-field", "prompt", "--out", str(out)],
            "rlhf sft: error: --text-field, --prompt-field, --completion-field and --messages-field "
            "must name four different fields",
        ),
    ]
    for argv, start in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), err
    assert not out.exists()


def test_micro_batches_agree_in_bf16_to_its_precision(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    """On a GPU the passes run under bf16 autocast; rows padded to other lengths then sum in
    another order, so micro-batches agree to bf16's precision (8 bits), not to fp32's."""

    import rlhf.sft.train as sft_train

    calls = []

    def bf16(device):
        calls.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(sft_train, "autocast", bf16)
    runs = []
    for name, micro in (("a", 0), ("b", 3)):
        cfg = _config(tmp_path, tiny_model_dir, out=str(tmp_path / name), micro_batch_size=micro)
        runs.append(train_sft(cfg, progress=False))
    assert calls  # the passes ran under bf16 autocast
    whole, split = runs
    assert whole["after"]["loss"] < 0.7 * whole["before"]["loss"]
    assert split["after"]["loss"] == pytest.approx(whole["after"]["loss"], rel=2e-2)
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("a", "b")
    ]
    for r0, r1 in zip(*rows):
        for key in ("sft/loss", "sft/tokens", "sft/lr"):
            if key in r0:
                assert r0[key] == pytest.approx(r1[key], rel=2e-2), key
