"""Shared fixtures: a tiny tokenizer and tiny GPT-2 / Llama models saved to temporary folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast and never fights a busy machine
# The CLI's --threads auto follows $OMP_NUM_THREADS when it is set, so that runs made in-process
# here use one thread as the torchrun workers they are compared with do (sums in bf16 depend on it).
os.environ["OMP_NUM_THREADS"] = "1"

# Eight prompts of different lengths, so every batch of them is left-padded.
PROMPTS = [
    "the plot",
    "this phone is great . the battery",
    "i watched this film and i loved",
    "the",
    "the headphones broke after a week .",
    "the blender is loud but",
    "the acting was superb and the story",
    "i want",
]

TINY_TEXTS = [
    "the acting was superb and the story was moving .",
    "the plot was dull and the ending felt weak .",
    "this phone is great . the battery lasts all day .",
    "the headphones broke after a week . i want a refund .",
    "i watched this film and i loved every minute of it .",
    "the blender is loud but it works well .",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf.task.tokenizer import train_tokenizer

    return train_tokenizer(TINY_TEXTS, vocab_size=300)


def make_tiny_lm(tokenizer, arch: str = "gpt2", seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_positions=128, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, **common,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def make_eos_biased_lm(tokenizer, arch: str = "gpt2", seed: int = 0, bias: float = 4.0):
    """A tiny model whose LM head leans toward EOS (an added bias), so that some responses end
    early and rows have different lengths."""
    lm = make_tiny_lm(tokenizer, arch, seed=seed)
    old = lm.lm_head
    lm.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        lm.lm_head.weight.copy_(old.weight)
        lm.lm_head.bias.zero_()
        lm.lm_head.bias[tokenizer.eos_token_id] = bias
    return lm


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    return make_tiny_lm(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 and its tokenizer saved in Hugging Face format."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny_lm(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def ppo_inputs(tmp_path, tiny_tokenizer, tiny_model_dir):
    """A reward-model folder for the tiny GPT-2 and a plain-text prompt file of PROMPTS."""
    from rlhf.models.reward_model import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        rm_dir
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return tiny_model_dir, rm_dir, prompts
