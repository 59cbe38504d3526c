"""LoRA through peft: the reference for free, adapters saved in PEFT's format, a merged model that
plain transformers loads, LoRA reward models that share the policy's base, and resume.

Shapes: B batch, R response tokens, V vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PROMPTS, make_tiny_lm
from rlhf.cli import main
from rlhf.models.forward import accepts_kwarg, position_ids_from_mask
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import LoraArgs, apply_lora, is_peft
from rlhf.models.policy import load_policy
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig, PPORunConfig
from rlhf.rl.run import train_ppo
from rlhf.rl.trainer import PPOTrainer

SMALL = dict(batch_size=8, minibatch_size=4, ppo_epochs=2, response_tokens=6, steps=10, lr=1e-2)
LORA = LoraArgs(lora_r=4, lora_alpha=8.0)


def _lora_trainer(tok, arch="gpt2", **config) -> PPOTrainer:
    policy = apply_lora(make_tiny_lm(tok, arch, seed=0), LORA)
    reward_model = RewardModel(make_tiny_lm(tok, arch, seed=2), tokenizer=tok)
    return PPOTrainer(policy, None, reward_model, tok, PPOConfig(**{**SMALL, **config}))


def _response_logprobs(lm, b) -> torch.Tensor:
    """Log-probs of the sampled responses under `lm`, computed here without the trainer."""
    ids, mask = b.query_response, b.attention_mask
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    logp = torch.log_softmax(logits.logits[:, b.P - 1 : -1].float(), -1)  # (B, R, V)
    return logp.gather(-1, ids[:, b.P :, None]).squeeze(-1) * b.response_mask  # (B, R)


def test_peft_wrappers_pass_position_ids(tiny_tokenizer):
    """PEFT's forward takes **kwargs; position ids must still reach the model (ppo-details 4)."""
    peft_lm = apply_lora(make_tiny_lm(tiny_tokenizer), LORA)
    assert accepts_kwarg(peft_lm, "position_ids") and accepts_kwarg(peft_lm, "logits_to_keep")
    assert not accepts_kwarg(peft_lm, "no_such_argument")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_policy_and_reference_logprobs_ignore_left_padding(tiny_tokenizer, arch):
    """A short prompt scored alone and beside a long one (left-padded) gets the same policy and
    reference log-probs through the PEFT model, after training has made the adapters non-zero."""
    trainer = _lora_trainer(tiny_tokenizer, arch)
    trainer.step(PROMPTS)  # adapters are no longer zero
    short, long = "the", "the acting was superb and the story was moving and"
    both = _lora_trainer(tiny_tokenizer, arch)
    both.policy.load_state_dict(trainer.policy.state_dict())
    both.generator.set_state(torch.Generator().manual_seed(123).get_state())
    trainer.generator.set_state(torch.Generator().manual_seed(123).get_state())
    alone, batched = trainer.rollout([short, short]), both.rollout([short, long])
    assert batched.P > alone.P  # the short prompt really is left-padded in the batch
    assert alone.texts[0] == batched.texts[0]
    n = int(alone.response_mask[0].sum())
    for name in ("logprobs", "ref_logprobs"):
        torch.testing.assert_close(
            getattr(alone, name)[0, :n], getattr(batched, name)[0, :n], atol=1e-5, rtol=0
        )


def test_lora_reference_is_the_base_model(tiny_tokenizer):
    """After training, the adapters-off reference still gives the untouched base model's
    log-probs, while the policy's have moved: one copy of the weights serves both."""
    trainer = _lora_trainer(tiny_tokenizer)
    for _ in range(3):
        trainer.step(PROMPTS)
    base = make_tiny_lm(tiny_tokenizer, seed=0)  # the same weights, never wrapped or trained
    b = trainer.rollout(PROMPTS)
    torch.testing.assert_close(b.ref_logprobs, _response_logprobs(base, b), atol=1e-5, rtol=0)
    assert (b.logprobs - b.ref_logprobs).abs().max() > 1e-3  # the policy did move
    assert trainer.ref_model is None
    trained = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("value_head") for n in trained)


def _argv(model_dir, rm_dir, prompts, out, *extra) -> list[str]:
    return [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts", str(prompts),
        "--out", str(out), "--steps", "3", "--batch-size", "4", "--minibatch-size", "2",
        "--response-tokens", "6", "--lr", "1e-2", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_lora_ppo_saves_an_adapter_and_a_merged_model(tmp_path, ppo_inputs, dtype):
    """The merged model is the float32 base plus the adapter, also when training held the base
    in bf16 (what --dtype auto does on a GPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, rm_dir, prompts = ppo_inputs
    out = tmp_path / "run"
    argv = _argv(model_dir, rm_dir, prompts, out, "--lora-r", "4", "--merge-lora", "--dtype", dtype)
    assert main(argv) == 0
    assert (out / "policy" / "adapter_config.json").is_file()
    assert not (out / "policy" / "model.safetensors").exists()  # no second copy of the base
    adapter = json.loads((out / "policy" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(model_dir.resolve())

    peft_lm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), out / "policy"
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "policy-merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[5, 17, 42, 9, 120]])
    with torch.no_grad():
        a, m, o = (x(input_ids=ids).logits for x in (peft_lm.eval(), merged.eval(), base.eval()))
    torch.testing.assert_close(a, m, atol=1e-4, rtol=0)  # merged == base + adapter
    assert (a - o).abs().max() > 1e-4  # and the adapter learned something
    policy = load_policy(out / "policy")  # ours: the adapter on its base, with the value head
    assert is_peft(policy.lm)


def test_cli_lora_resume_matches_an_uninterrupted_run(tmp_path, ppo_inputs):
    """A LoRA run stopped after 2 steps and resumed to 4 logs what an uninterrupted one does."""
    model_dir, rm_dir, prompts = ppo_inputs
    common = dict(
        model=str(model_dir), reward_model=str(rm_dir), prompts=str(prompts), batch_size=4,
        minibatch_size=2, response_tokens=6, lr=1e-2, lora_r=4, save_every=1,
    )  # fmt: skip
    train_ppo(PPORunConfig(out=str(tmp_path / "whole"), steps=4, **common), progress=False)
    train_ppo(PPORunConfig(out=str(tmp_path / "cut"), steps=2, **common), progress=False)
    train_ppo(
        PPORunConfig(out=str(tmp_path / "cut"), steps=4, resume=True, **common), progress=False
    )
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("whole", "cut")
    }
    assert [r["step"] for r in rows["cut"]] == [0, 1, 2, 3]
    for a, b in zip(rows["whole"], rows["cut"]):
        for key in ("objective/reward", "objective/kl", "loss/policy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    # The checkpoint holds the adapters and value head, not the frozen base.
    ckpt = next((tmp_path / "cut" / "checkpoints").iterdir()) / "policy.safetensors"
    from safetensors.torch import load_file

    names = load_file(str(ckpt)).keys()
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)


def _lora_reward_model(tok, model_dir, out):
    """A LoRA reward model on the tiny base whose adapter and head are not a no-op."""
    lm = load_causal_lm(model_dir)
    rm = RewardModel(apply_lora(lm, LORA), freeze_base=False, tokenizer=tok)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rm.save_pretrained(out)
    return rm


def test_lora_reward_model_saves_its_adapter_and_reloads(tmp_path, tiny_tokenizer, tiny_model_dir):
    rm = _lora_reward_model(tiny_tokenizer, tiny_model_dir, tmp_path / "rm").eval()
    assert (tmp_path / "rm" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "rm" / "reward_config.json").read_text())["lora"] is True
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 17, 42, 9], [3, 8, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), rm(ids), atol=1e-5, rtol=0)
        plain = RewardModel(load_causal_lm(tiny_model_dir), tokenizer=tiny_tokenizer)
        plain.reward_head.load_state_dict(rm.reward_head.state_dict())
        assert (plain(ids) - rm(ids)).abs().max() > 1e-3  # the adapter matters


def test_lora_reward_model_on_the_policys_base_is_not_copied(
    tmp_path, tiny_tokenizer, tiny_model_dir
):
    """PPO with a LoRA policy and a LoRA reward model on the same base holds one base: the reward
    adapter sits beside the policy's, and scores as the stand-alone reward model does."""
    standalone = _lora_reward_model(tiny_tokenizer, tiny_model_dir, tmp_path / "rm").eval()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    from rlhf.rl.inputs import load_run_inputs

    cfg = PPORunConfig(
        model=str(tiny_model_dir), reward_model=str(tmp_path / "rm"), prompts=str(prompts),
        lora_r=4, batch_size=4, minibatch_size=2, response_tokens=6,
        device="cpu",  # compared with the float32 stand-alone model on the CPU
    )  # fmt: skip
    _, policy, ref, reward_model, tok = load_run_inputs(cfg, progress=False)
    assert ref is None and reward_model.base_model is policy
    trainer = PPOTrainer(policy, ref, reward_model, tok, cfg)
    base_weights = {p.data_ptr() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    reward_weights = {
        p.data_ptr()
        for n, p in trainer.reward_model.named_parameters()
        if "lora_" not in n and "reward_head" not in n
    }
    assert reward_weights <= base_weights  # no tensor of the reward model's base is its own
    ids = torch.tensor([[5, 17, 42, 9], [3, 8, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.reward_model(ids), standalone(ids), atol=1e-5, rtol=0)
    before = trainer.reward_model(ids).detach()
    trainer.step(PROMPTS[:4])
    with torch.no_grad():  # training the policy's adapter leaves the reward adapter alone
        torch.testing.assert_close(trainer.reward_model(ids), before, atol=1e-6, rtol=0)
    assert trainer.policy.lm.active_adapter == "default"


def test_cli_lora_reward_training_end_to_end(tmp_path, tiny_model_dir):
    prefs = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": "the acting was",
            "chosen": "superb and moving .",
            "rejected": "dull and weak .",
        },
        {"prompt": "this phone", "chosen": "is great .", "rejected": "broke after a week ."},
    ] * 8
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm-run"
    argv = [
        "train-reward", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(out),
        "--lora-r", "4", "--epochs", "2", "--batch-size", "4", "--normalise-samples", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    folder = out / "reward_model"
    assert (folder / "adapter_config.json").is_file() and not (
        folder / "model.safetensors"
    ).exists()
    rm = RewardModel.from_pretrained(folder)
    assert (
        rm.is_lora
        and load_tokenizer(folder).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()
    )


@pytest.mark.parametrize(
    "argv_extra, message",
    [
        (["--lora-r", "-1"], "--lora-r must be >= 0"),
        (["--merge-lora"], "--merge-lora needs --lora-r"),
        (["--lora-r", "4", "--lora-target-modules", "q_proj"], "--lora-target-modules q_proj"),
    ],
)
def test_bad_lora_options_are_one_line(tmp_path, ppo_inputs, capsys, argv_extra, message):
    model_dir, rm_dir, prompts = ppo_inputs
    assert main(_argv(model_dir, rm_dir, prompts, tmp_path / "run", *argv_extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
