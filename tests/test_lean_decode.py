"""The lean decode step (`models.lean_decode`): the model's own modules without transformers'
per-call bookkeeping. It must give the forward's logits bit for bit, so sampling with it draws
the same tokens with the same log-probs, and anything it gets wrong must fall back to the forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlhf.models import lean_decode
from rlhf.models.generation import sample_responses
from rlhf.models.lora import apply_lora
from rlhf.models.lora_args import LoraArgs

V, EOS, PAD = 96, 3, 0


def _rotary(cls, config_cls, **extra):
    config = config_cls(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra,
    )  # fmt: skip
    return cls(config)


MODELS = {
    "llama": lambda: _rotary(LlamaForCausalLM, LlamaConfig),
    "qwen2": lambda: _rotary(Qwen2ForCausalLM, Qwen2Config),  # biases on q, k, v
    "qwen3": lambda: _rotary(Qwen3ForCausalLM, Qwen3Config, head_dim=8),  # per-head q/k norms
    "mistral": lambda: _rotary(MistralForCausalLM, MistralConfig, sliding_window=None),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=EOS)
    ),
}


def _model(arch: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[arch]().to(dtype).eval()


def _prompts(padded: bool, seed: int = 1):
    """6 rows: 3 distinct prompts sampled twice each (a GRPO group shares its prefill)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 7), generator=g).repeat_interleave(2, 0)  # (6, 7)
    mask = torch.ones_like(ids)
    if padded:
        mask[0:2, :3] = 0
        mask[4:6, :1] = 0
        ids = ids.masked_fill(mask == 0, PAD)
    uniforms = torch.rand(6, 12, generator=g, dtype=torch.float64)
    return ids, mask, uniforms


def _sample(lm, padded: bool, monkeypatch, lean: bool):
    monkeypatch.setenv("RLHF_LEAN_DECODE", "1" if lean else "0")
    ids, mask, uniforms = _prompts(padded)
    return sample_responses(
        lm, ids, mask, 12, EOS, PAD, temperature=0.9, uniforms=uniforms, return_logprobs=True
    )


def _count_lean_steps(monkeypatch) -> list[int]:
    calls = [0]
    inner = lean_decode.LeanDecoder._logits

    def counted(self, *args):
        calls[0] += 1
        return inner(self, *args)

    monkeypatch.setattr(lean_decode.LeanDecoder, "_logits", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_lean_sampling_is_the_forwards_bit_for_bit(arch, dtype, monkeypatch):
    lm = _model(arch, dtype)
    calls = _count_lean_steps(monkeypatch)
    for padded in (False, True):
        before = calls[0]
        plain = _sample(lm, padded, monkeypatch, lean=False)
        assert calls[0] == before
        lean = _sample(lm, padded, monkeypatch, lean=True)
        decoder = lean_decode.decoder_for(lm)
        # checked on its first step against the forward, then used for the other ten
        assert decoder is not None and decoder.verdicts[(padded, dtype, torch.device("cpu"), False)]
        assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])
        again = _sample(lm, padded, monkeypatch, lean=True)
        assert torch.equal(plain[0], again[0]) and torch.equal(plain[1], again[1])
    assert calls[0] == 2 * (11 + 11)  # every decode step of the lean runs went the lean way


def test_lean_step_logits_equal_the_forward_with_lora(monkeypatch):
    """The adapters live in the projections the lean step calls: a LoRA policy samples the same."""
    lm = apply_lora(_model("llama"), LoraArgs(lora_r=4, lora_alpha=8.0))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a skipped LoRA
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    calls = _count_lean_steps(monkeypatch)
    plain = _sample(lm, True, monkeypatch, lean=False)
    lean = _sample(lm, True, monkeypatch, lean=True)
    assert (
        calls[0] == 11
        and lean_decode.decoder_for(lm).verdicts[(True, torch.float32, lm.device, False)]
    )
    assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])
    with lm.disable_adapter():  # the base alone samples otherwise: the adapter made a difference
        base = _sample(lm, True, monkeypatch, lean=False)
    assert not torch.equal(base[1], lean[1])


def test_a_lean_step_that_differs_falls_back_to_the_forward(monkeypatch):
    lm = _model("llama")
    plain = _sample(lm, True, monkeypatch, lean=False)
    inner = lean_decode.LeanDecoder._logits
    monkeypatch.setattr(lean_decode.LeanDecoder, "_logits", lambda self, *a: inner(self, *a) + 1e-6)
    out = _sample(lm, True, monkeypatch, lean=True)
    assert lean_decode.decoder_for(lm).verdicts == {
        (True, torch.float32, torch.device("cpu"), False): False
    }
    assert torch.equal(plain[0], out[0]) and torch.equal(plain[1], out[1])


def test_a_lean_step_that_raises_falls_back_to_the_forward(monkeypatch):
    lm = _model("gpt2")
    plain = _sample(lm, False, monkeypatch, lean=False)

    def broken(self, *args):
        raise AttributeError("no such module")

    monkeypatch.setattr(lean_decode.LeanDecoder, "_gpt2", broken)
    out = _sample(lm, False, monkeypatch, lean=True)
    assert lean_decode.decoder_for(lm).verdicts == {
        (False, torch.float32, torch.device("cpu"), False): False
    }
    assert torch.equal(plain[0], out[0]) and torch.equal(plain[1], out[1])


def test_models_the_lean_step_does_not_know_keep_the_forward(monkeypatch):
    monkeypatch.setenv("RLHF_LEAN_DECODE", "1")
    mixed = _rotary(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=4)
    mixed.config.layer_types = ["sliding_attention", "full_attention"]
    assert lean_decode.decoder_for(mixed) is None
    eager = _model("llama")
    eager.config._attn_implementation = "flex_attention"
    assert lean_decode.decoder_for(eager) is None
    monkeypatch.setenv("RLHF_LEAN_DECODE", "0")
    assert lean_decode.decoder_for(_model("llama")) is None


def test_a_sliding_window_model_keeps_the_forward(monkeypatch):
    """Mistral with a window of 10 and 7 + 12 tokens: its cache is a sliding one, which the lean
    step does not write, so every step runs the forward (and the tokens are the forward's)."""
    torch.manual_seed(0)
    lm = _rotary(MistralForCausalLM, MistralConfig, sliding_window=10).eval()
    calls = _count_lean_steps(monkeypatch)
    plain = _sample(lm, False, monkeypatch, lean=False)
    lean = _sample(lm, False, monkeypatch, lean=True)
    assert calls[0] == 0
    assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_sampling_under_bf16_autocast(arch, monkeypatch):
    """The trainer's bf16: fp32 weights, products in bf16 under autocast. Same tokens, same bits."""
    lm = _model(arch)
    calls = _count_lean_steps(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _sample(lm, True, monkeypatch, lean=False)
        lean = _sample(lm, True, monkeypatch, lean=True)
    assert calls[0] == 11
    assert lean_decode.decoder_for(lm).verdicts == {
        (True, torch.float32, torch.device("cpu"), True): True
    }
    assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])
