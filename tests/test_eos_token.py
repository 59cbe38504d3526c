"""`--eos-token`: chat models whose template closes a reply with a token other than EOS.

Responses stop at the tokenizer's EOS, scoring appends it and the reward is read there. A model
whose template ends a turn with, say, <|end|> (Phi-3; Gemma's <end_of_turn>) would run past the
end of its turn; `--eos-token` makes that token the EOS in train-reward, ppo and dpo alike, and a
run that uses the template without it gets one warning line.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_lm
from rlhf.cli import main
from rlhf.errors import ConfigError
from test_data_formats import BAD, GOOD, PROMPTS, SMALL, TEMPLATE, bot, user

END = "<|end|>"
WARNING = f"closes a reply with {END}, but replies stop at the tokenizer's EOS"


@pytest.fixture(scope="module")
def turn_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny chat model whose template closes each turn with its own special token <|end|>."""
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": [END]})
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("turns") / "model"
    make_tiny_lm(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_turn_end_token_is_found_in_the_template(turn_model_dir, tiny_model_dir):
    from rlhf.models.loading import load_tokenizer, turn_end_token

    tok = load_tokenizer(turn_model_dir)
    assert turn_end_token(tok) == END
    # Closed by EOS itself (Qwen's <|im_end|>), by plain text, or no template: nothing to say.
    tok.chat_template = TEMPLATE.replace("<|end|>", "{{ eos_token }}")
    assert turn_end_token(tok) is None
    plain = load_tokenizer(tiny_model_dir)
    assert turn_end_token(plain) is None
    plain.chat_template = TEMPLATE  # "<|end|>" is no token of this vocabulary, only text
    assert turn_end_token(plain) is None


def test_eos_token_must_be_one_token(turn_model_dir):
    from rlhf.models.loading import load_tokenizer, set_eos_token

    tok = load_tokenizer(turn_model_dir)
    with pytest.raises(ConfigError) as err:
        set_eos_token(tok, "<|stop|>", turn_model_dir)
    msg = str(err.value)
    assert msg.startswith(
        f"--eos-token '<|stop|>' is not one token of the tokenizer in {turn_model_dir}"
    )
    assert "\n" not in msg and "it splits into" in msg
    before = tok.eos_token_id
    set_eos_token(tok, END, turn_model_dir)
    assert tok.eos_token == END and tok.eos_token_id != before
    assert tok.pad_token_id not in (None, tok.eos_token_id)


def test_train_reward_and_ppo_end_replies_at_the_eos_token(tmp_path, turn_model_dir, capsys):
    from rlhf.data import PreferencePair
    from rlhf.models.generation import render_conversation_pairs
    from rlhf.models.loading import load_tokenizer
    from rlhf.reward.loss import encode_texts
    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.inputs import load_run_inputs
    from rlhf.rl.trainer import PPOTrainer

    data = tmp_path / "conv.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": [user(p)], "chosen": [bot(g)], "rejected": [bot(b)]}) + "\n"
            for p in PROMPTS
            for g, b in zip(GOOD, BAD)
        )
    )
    args = ["train-reward", "--data", str(data), "--model", str(turn_model_dir), *SMALL]

    # Without the option: one warning, and the reward model ends on the tokenizer's EOS.
    assert main([*args, "--out", str(tmp_path / "rm-plain")]) == 0
    printed = capsys.readouterr().out
    assert printed.count(WARNING) == 1 and f"--eos-token '{END}'" in printed

    # With it: the reply ends where its turn does, in <|end|>, and the saved tokenizer says so.
    rm = tmp_path / "rm"
    assert main([*args, "--out", str(rm), "--eos-token", END]) == 0
    assert WARNING not in capsys.readouterr().out
    rm_tok = load_tokenizer(rm / "reward_model")
    assert rm_tok.eos_token == END
    end_id = rm_tok.convert_tokens_to_ids(END)
    pair = PreferencePair([user("hi")], [bot("great")], [bot("dull")], None, "f.jsonl:1")
    [rendered] = render_conversation_pairs(rm_tok, [pair], "f.jsonl")
    assert (rendered.chosen, rendered.rejected) == ("great", "dull")
    [row], _ = encode_texts(rm_tok, [rendered.prompt], [rendered.chosen], 100)
    assert row[-1] == end_id and row.count(end_id) == 2  # the user's turn, then the reply's

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [user(p)]}) + "\n" for p in PROMPTS))
    cfg = PPORunConfig(
        model=str(turn_model_dir), reward_model=str(rm), prompts=str(prompts), device="cpu",
        batch_size=4, minibatch_size=4, response_tokens=6,
    )  # fmt: skip
    # PPO without the option: told about the template and about the reward model's EOS.
    load_run_inputs(cfg, progress=False)
    printed = capsys.readouterr().out
    assert WARNING in printed
    assert f"trained on responses ending in {END}" in printed

    cfg.eos_token = END
    _, policy, ref, reward_model, tok = load_run_inputs(cfg, progress=False)
    assert capsys.readouterr().out == ""
    assert tok.eos_token == END
    # A policy that always says <|end|> ends every reply at once: sampling stops at the new EOS.
    head = nn.Linear(policy.lm_head.in_features, policy.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.lm_head.weight)
        head.bias.zero_()
        head.bias[end_id] = 50.0
    policy.lm_head = head
    rollout = PPOTrainer(policy, ref, reward_model, tok, cfg).rollout(["<|user|>\nhi<|end|>\n"])
    assert rollout.ended == [True] and rollout.response_mask.sum().item() == 1
    assert rollout.query_response[0, rollout.P].item() == end_id  # the first response token


def test_ppo_command_saves_the_option(tmp_path, turn_model_dir, ppo_inputs):
    _, rm_dir, prompts = ppo_inputs
    out = tmp_path / "run"
    code = main([
        "ppo", "--model", str(turn_model_dir), "--reward-model", str(rm_dir),
        "--prompts", str(prompts), "--out", str(out), "--steps", "1", "--batch-size", "4",
        "--minibatch-size", "4", "--response-tokens", "4", "--device", "cpu",
        "--eos-token", END,
    ])  # fmt: skip
    assert code == 0
    assert json.loads((out / "config.json").read_text())["eos_token"] == END
