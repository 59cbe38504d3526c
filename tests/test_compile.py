"""--compile: the policy's and the reference's forward through torch.compile. The run must compute
what the eager one does, up to float rounding, with the compiled graphs actually in use."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils

from conftest import make_eos_biased_lm
from rlhf.errors import ConfigError
from rlhf.models.forward import is_compiled
from rlhf.reward.sources import RewardFunction, RewardTerm
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer

PROMPTS = ["the plot", "this phone is great . the battery", "i watched this film and", "the"]


def _length(completions, **kwargs) -> list[float]:
    return [len(c) / 20 for c in completions]


def _trainer(tok, **config) -> PPOTrainer:
    cfg = PPOConfig(
        batch_size=4, samples_per_prompt=2, minibatch_size=8, ppo_epochs=2, response_tokens=6,
        lr=1e-3, advantage_estimator="grpo", **config,
    )  # fmt: skip
    return PPOTrainer(
        make_eos_biased_lm(tok, "llama", seed=0), make_eos_biased_lm(tok, "llama", seed=1), None,
        tok, cfg, reward_terms=[RewardTerm(RewardFunction(_length, name="length"))],
    )  # fmt: skip


def test_a_compiled_step_computes_the_eager_one(tiny_tokenizer):
    eager, compiled = _trainer(tiny_tokenizer), _trainer(tiny_tokenizer, compile=True)
    assert is_compiled(compiled.policy.lm) and is_compiled(compiled.ref_model)
    assert not is_compiled(eager.policy.lm)
    torch._dynamo.utils.counters.clear()
    a, b = eager.step(PROMPTS), compiled.step(PROMPTS)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 3  # sampling, the reference pass and the update, at least
    assert eager.last_rollout.texts == compiled.last_rollout.texts  # the same samples
    lengths = {len(t) for t in eager.last_rollout.texts}
    assert len(lengths) > 1  # responses of several lengths went through the same graphs
    for key in ("objective/reward", "objective/kl", "loss/policy", "policy/entropy",
                "policy/grad_norm", "policy/approxkl"):  # fmt: skip
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert b["rollout/logprob_diff_max"] < 1e-5  # the sampler's log-probs are the update's
    for (name, p), q in zip(eager.policy.lm.named_parameters(), compiled.policy.lm.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    moved = max(
        (p - p0).abs().max().item()
        for p, p0 in zip(
            eager.policy.lm.parameters(),
            make_eos_biased_lm(tiny_tokenizer, "llama", seed=0).parameters(),
        )
    )
    assert moved > 1e-4  # the update changed the weights, so equal weights mean equal updates


def test_a_compiled_bf16_step_computes_the_eager_one(tiny_tokenizer):
    """The bf16 twin: products in bf16 under autocast, so the compiled graphs (which may fuse and
    round in another order) agree to bf16's precision, not fp32's."""
    eager = _trainer(tiny_tokenizer, dtype="bfloat16")
    compiled = _trainer(tiny_tokenizer, dtype="bfloat16", compile=True)
    assert is_compiled(compiled.policy.lm) and is_compiled(compiled.ref_model)
    a, b = eager.step(PROMPTS), compiled.step(PROMPTS)
    assert eager.last_rollout.texts == compiled.last_rollout.texts
    assert a["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert b["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    for key in ("objective/reward", "objective/kl", "loss/policy", "policy/entropy",
                "policy/grad_norm", "policy/approxkl"):  # fmt: skip
        assert b[key] == pytest.approx(a[key], rel=1e-2, abs=1e-5), key
    assert b["rollout/logprob_diff_max"] < 1e-3
    start = make_eos_biased_lm(tiny_tokenizer, "llama", seed=0).parameters()
    pairs = list(zip(eager.policy.lm.parameters(), compiled.policy.lm.parameters(), start))
    gap = torch.cat([(q - p).abs().flatten() for p, q, _ in pairs])
    moved = torch.cat([(p - p0).abs().flatten() for p, _, p0 in pairs])
    # AdamW's first steps are about lr x sign(gradient): a weight whose gradient is near zero may
    # step either way, so the updates are compared as a whole (seen: gap 0.3% of the movement).
    assert gap.mean() < 0.02 * moved.mean() and moved.mean() > 1e-4
    assert (gap > 1e-4).float().mean() < 0.02  # seen 0.4%


def test_compile_with_shard_is_refused(tiny_tokenizer):
    with pytest.raises(ConfigError, match="--compile does not take --shard"):
        _trainer(tiny_tokenizer, compile=True, shard=True)


def test_a_compiled_dpo_step_computes_the_eager_one(tiny_tokenizer):
    from rlhf.models.forward import compile_forward
    from rlhf.reward.preferences import Pairs
    from rlhf.rl.dpo import DPOStep, batched_logps, encode_pairs

    tok = tiny_tokenizer
    prompts = ["the plot", "this phone is great .", "i watched this film and", "the"]
    chosen_text = [" was fine", " the battery lasts", " loved it", " best film ever made"]
    rejected_text = [" was bad", " broke", " hated every minute of it", " worst"]
    pairs = Pairs(prompts, chosen_text, rejected_text, [None] * 4)
    chosen, rejected, _ = encode_pairs(tok, pairs, 64)
    ref = make_eos_biased_lm(tok, "llama", seed=1).requires_grad_(False)
    ref_logps = batched_logps(ref, chosen, rejected, tok.pad_token_id, torch.device("cpu"), 4)
    out = []
    for compiled in (False, True):
        policy = make_eos_biased_lm(tok, "llama", seed=0)
        if compiled:
            compile_forward(policy)
        step = DPOStep(policy, lr=1e-3, total_steps=4, beta=0.1)
        (loss, r_c, r_r), _ = step.run(chosen, rejected, ref_logps, tok.pad_token_id)
        out.append((loss, r_c, policy))
    assert is_compiled(out[1][2]) and not is_compiled(out[0][2])
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)
    for p, q in zip(out[0][2].parameters(), out[1][2].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
