"""Memory-lean PPO on one device: micro-batches, rollout chunks, gradient checkpointing, dtype.

Each option trades memory for time and must not change what is computed: the same update to
~1e-5 whatever the micro-batch size, the same rollout whatever the chunk size.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import PROMPTS, make_eos_biased_lm, make_tiny_lm
from rlhf.errors import ConfigError
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer

SMALL = dict(batch_size=8, minibatch_size=4, ppo_epochs=2, response_tokens=6, steps=10, lr=1e-3)


def _trainer(tok, arch="gpt2", **config) -> PPOTrainer:
    policy = make_eos_biased_lm(tok, arch)  # some responses end early: rows of other lengths
    reward_model = RewardModel(make_tiny_lm(tok, arch, seed=2), tokenizer=tok)
    return PPOTrainer(
        policy, copy.deepcopy(policy), reward_model, tok, PPOConfig(**{**SMALL, **config})
    )


def _params(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_give_the_same_update(tiny_tokenizer, arch, micro):
    """Two steps with minibatches of 4 split into micro-batches of 1 (or 3 and 1) change the
    weights as whole minibatches do, to 1e-5: the loss is normalised by the minibatch's tokens."""
    whole, split = (
        _trainer(tiny_tokenizer, arch),
        _trainer(tiny_tokenizer, arch, micro_batch_size=micro),
    )
    start = _params(whole)
    for _ in range(2):
        m_whole, m_split = whole.step(PROMPTS), split.step(PROMPTS)
    lengths = whole.last_rollout.response_mask.sum(1)
    assert lengths.min() < lengths.max(), "rows of different lengths make the test meaningful"
    moved = _max_diff(_params(whole), start)
    assert moved > 1e-3, "the update must move the weights for the comparison to mean anything"
    assert _max_diff(_params(whole), _params(split)) < 1e-5
    for key in ("loss/policy", "loss/value", "policy/approxkl", "policy/entropy", "objective/kl"):
        assert m_split[key] == pytest.approx(m_whole[key], abs=1e-5, rel=1e-4), key


def test_a_wrong_normalisation_would_show(tiny_tokenizer):
    """The invariance above is not automatic: averaging each micro-batch's own mean (what plain
    gradient accumulation does) moves the weights differently, by far more than 1e-5."""
    whole = _trainer(tiny_tokenizer)
    naive = _trainer(tiny_tokenizer, micro_batch_size=1)

    original = naive._micro_loss

    def per_micro_mean(b, idx, w, response, tw):  # each micro-batch's own token-mean, / 4 of them
        mask = b.response_mask[idx]  # (1, R)
        micro_per_minibatch = naive.config.minibatch_size // naive.config.micro_batch_size
        return original(b, idx, mask / mask.sum() / micro_per_minibatch, response, tw)

    naive._micro_loss = per_micro_mean
    whole.step(PROMPTS)
    naive.step(PROMPTS)
    assert _max_diff(_params(whole), _params(naive)) > 1e-4


def test_rollout_chunks_give_the_same_rollout(tiny_tokenizer):
    """Chunks of 3 rows (3 + 3 + 2, each padded to its own lengths) give the rollout that one
    pass over 8 rows gives: same tokens, same log-probs, values, scores and advantages."""
    one, chunked = _trainer(tiny_tokenizer), _trainer(tiny_tokenizer, rollout_batch_size=3)
    a, b = one.rollout(PROMPTS), chunked.rollout(PROMPTS)
    assert a.texts == b.texts and torch.equal(a.query_response, b.query_response)
    assert torch.equal(a.attention_mask, b.attention_mask)
    for name in ("logprobs", "ref_logprobs", "values", "scores", "advantages", "returns"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)


def _gradient(trainer: PPOTrainer) -> torch.Tensor:
    """The gradient of the step's one minibatch (it stays on the parameters after the step)."""
    return torch.cat([p.grad.flatten() for p in trainer.params])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_give_the_same_gradient_in_bf16(tiny_tokenizer, arch, micro):
    """In bf16 a micro-batch padded to its own lengths rounds differently from the whole
    minibatch (kernels accumulate in a shape-dependent order, and bf16 keeps 8 bits), so the
    invariance holds to bf16's precision, not to fp32's: the gradient to 1% (measured 0.1-0.2%;
    1e-7 in fp32), the logged losses to 1e-4. A wrong normalisation is far outside that. (Weights
    after AdamW are no measure here: it moves every weight by about lr, whatever the sign of a
    gradient's last bits.)"""
    one = dict(ppo_epochs=1, minibatch_size=8, dtype="bfloat16")
    whole, split = (
        _trainer(tiny_tokenizer, arch, **one),
        _trainer(tiny_tokenizer, arch, micro_batch_size=micro, **one),
    )
    naive = _trainer(tiny_tokenizer, arch, micro_batch_size=micro, **one)
    original = naive._micro_loss

    def per_micro_mean(b, idx, w, response, tw):  # each micro-batch's own token-mean
        mask = b.response_mask[idx]  # (m, R)
        n_micro = -(-naive.config.minibatch_size // micro)
        return original(b, idx, mask / mask.sum() / n_micro, response, tw)

    naive._micro_loss = per_micro_mean
    m_whole, m_split = whole.step(PROMPTS), split.step(PROMPTS)
    naive.step(PROMPTS)
    g = _gradient(whole)
    assert (_gradient(split) - g).norm() / g.norm() < 1e-2
    assert (_gradient(naive) - g).norm() / g.norm() > 5e-2
    for key in ("loss/policy", "loss/value", "policy/approxkl", "policy/entropy", "objective/kl"):
        assert m_split[key] == pytest.approx(m_whole[key], abs=1e-4, rel=1e-4), key


def test_rollout_chunks_give_the_same_rollout_in_bf16(tiny_tokenizer):
    """bf16: the same tokens, scores and values; log-probs to bf16's precision (the chunks are
    padded to their own lengths; measured 1.2e-4), with the policy and the reference off by the
    same amount, so the per-token KL agrees to 1e-5."""
    one = _trainer(tiny_tokenizer, dtype="bfloat16")
    chunked = _trainer(tiny_tokenizer, rollout_batch_size=3, dtype="bfloat16")
    a, b = one.rollout(PROMPTS), chunked.rollout(PROMPTS)
    assert a.texts == b.texts and torch.equal(a.query_response, b.query_response)
    for name in ("values", "scores", "kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    for name in ("logprobs", "ref_logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-3, rtol=0)


def test_a_rows_response_does_not_depend_on_its_batch(tiny_tokenizer):
    """Sampling draws are per row and position, so a prompt's response is the same whether it is
    sampled with the others or alone in its chunk (what makes chunking and sharding invisible)."""
    together = _trainer(tiny_tokenizer).rollout(PROMPTS)
    alone = _trainer(tiny_tokenizer, rollout_batch_size=1).rollout(PROMPTS)
    assert together.texts == alone.texts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_checkpointing_gives_the_same_update(tiny_tokenizer, dtype):
    plain, checkpointed = (
        _trainer(tiny_tokenizer, dtype=dtype),
        _trainer(tiny_tokenizer, gradient_checkpointing=True, dtype=dtype),
    )
    lm = checkpointed.policy.lm
    # transformers 5.24 renamed is_gradient_checkpointing (the name the H100 machine's 5.17 has)
    on = getattr(lm, "is_activation_checkpointing", None)
    assert on if on is not None else lm.is_gradient_checkpointing
    plain.step(PROMPTS)
    metrics = checkpointed.step(PROMPTS)
    assert metrics["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)  # dropout stays off
    assert _max_diff(_params(plain), _params(checkpointed)) < 1e-6
    assert not checkpointed.policy.training  # back in eval mode for the next rollout


@pytest.mark.parametrize("value_model", ["shared", "reward"])
def test_bfloat16_halves_frozen_matmuls_keeps_the_reference_exact_and_trains_in_float32(
    tiny_tokenizer, value_model
):
    """bf16: the frozen linear layers are stored in bf16, the rest of the frozen models in fp32;
    the reference, a copy of the policy, gives the policy's log-probs (KL 0 at step 0); every
    parameter the optimizer holds is float32, the separate critic's too. tests/test_precision.py
    has the rest."""
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16", value_model=value_model)
    for model in (trainer.ref_model, trainer.reward_model):
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.bfloat16, torch.float32}, dtypes
    trained = {p.dtype for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {torch.float32}
    b = trainer.rollout(PROMPTS)
    assert torch.equal(b.logprobs * b.response_mask, b.ref_logprobs * b.response_mask)
    metrics = trainer.step(PROMPTS)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(micro_batch_size=-1), "--micro-batch-size must be >= 0"),
        (dict(micro_batch_size=8), "--micro-batch-size 8 is larger than --minibatch-size 4"),
        (dict(rollout_batch_size=-2), "--rollout-batch-size must be >= 0"),
        (dict(dtype="float16"), "--dtype must be one of auto, float32, bfloat16"),
    ],
)
def test_bad_sizes_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message):
        PPOConfig(**{**SMALL, **options}).validate()
