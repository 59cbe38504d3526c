"""The rollout engine's interface and the mismatch correction, without vLLM (tests/test_vllm.py
runs vLLM itself): the correction's weights and metrics by hand, in fp32 and bf16; the HF engine's
log-probs against the trainer's; the correction's effect on an update; refusals."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from conftest import PROMPTS, make_eos_biased_lm, make_tiny_lm
from rlhf.core import mismatch_metrics, rollout_correction_weights
from rlhf.errors import ConfigError
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig
from rlhf.rl.engines import row_seeds
from rlhf.rl.trainer import PPOTrainer

# Trainer's log p and the engine's log q of three tokens of two rows; row 1 ends after 2 tokens,
# its third position holds garbage that the mask must keep out.
P = [[-1.0, -2.0, -0.5], [-0.5, -1.5, 0.0]]
Q = [[-1.5, -1.0, -0.5], [-1.0, -1.5, float("nan")]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _inputs(dtype):
    return (torch.tensor(P, dtype=dtype), torch.tensor(Q, dtype=dtype), torch.tensor(MASK))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tis_weights_by_hand(dtype):
    """log p - log q = [0.5, -1, 0] and [0.5, 0, (masked)]; tis at cap 1.5: min(exp(.), 1.5)."""
    w = rollout_correction_weights(*_inputs(dtype), "tis", 1.5)
    want = torch.tensor([[1.5, math.exp(-1.0), 1.0], [1.5, 1.0, 1.0]])  # e^0.5 = 1.65 > 1.5
    torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    w2 = rollout_correction_weights(*_inputs(dtype), "tis", 2.0)
    assert w2[0, 0].item() == pytest.approx(math.exp(0.5), abs=1e-6)
    assert w.dtype == torch.float32 and not w.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_mask_by_hand(dtype):
    """Sequence log-ratios: row 0 0.5 - 1 + 0 = -0.5, row 1 0.5 + 0 = 0.5 (the nan is masked).
    At cap 1.5 (|log| <= 0.405) both are dropped; at cap 2 (0.693) both kept; a row whose ratio
    is e^-0.5 alone is kept by cap 1.7 (0.531)."""
    dropped = rollout_correction_weights(*_inputs(dtype), "mask", 1.5)
    assert torch.equal(dropped, torch.zeros(2, 3))
    kept = rollout_correction_weights(*_inputs(dtype), "mask", 2.0)
    assert torch.equal(kept, torch.ones(2, 3))
    p, q, mask = _inputs(dtype)
    q[1, 0] = -2.0  # row 1: 1.5 + 0 = 1.5 > 0.531
    mixed = rollout_correction_weights(p, q, mask, "mask", 1.7)
    assert torch.equal(mixed, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_no_correction_is_all_ones_and_an_unknown_one_is_refused():
    assert torch.equal(
        rollout_correction_weights(*_inputs(torch.float32), "none", 2.0), torch.ones(2, 3)
    )
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction_weights(*_inputs(torch.float32), "bogus", 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mismatch_metrics_by_hand(dtype):
    """|log p - log q| over the 5 real tokens: 0.5, 1, 0, 0.5, 0 -> mean 0.4, max 1; sequence
    ratios e^-0.5 and e^0.5, so KL(q||p) per sequence is the mean of 0.5 and -0.5 = 0; tis at cap
    1.5 truncates 2 of the 5 tokens."""
    m = mismatch_metrics(*_inputs(dtype), "tis", 1.5)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(0.4, abs=1e-6)
    assert m["rollout/logprob_diff_max"] == pytest.approx(1.0, abs=1e-6)
    assert m["rollout/kl"] == pytest.approx(0.0, abs=1e-6)
    # quantiles of [e^-0.5, e^0.5] by linear interpolation: 5% is 0.05 of the way up
    lo, hi = math.exp(-0.5), math.exp(0.5)
    assert m["rollout/seq_ratio_p05"] == pytest.approx(lo + 0.05 * (hi - lo), abs=1e-6)
    assert m["rollout/seq_ratio_p50"] == pytest.approx((lo + hi) / 2, abs=1e-6)
    assert m["rollout/corrected_frac"] == pytest.approx(2 / 5)
    weights = [1.5, math.exp(-1.0), 1.0, 1.5, 1.0]
    assert m["rollout/weight_mean"] == pytest.approx(sum(weights) / 5, abs=1e-6)
    assert mismatch_metrics(*_inputs(dtype), "mask", 1.5)["rollout/corrected_frac"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_engine_that_agrees_gets_weight_one_exactly(dtype):
    p = torch.tensor(P, dtype=dtype)
    mask = torch.tensor(MASK)
    for mode in ("tis", "mask"):
        assert torch.equal(
            rollout_correction_weights(p, p.clone(), mask, mode, 1.01), torch.ones(2, 3)
        )
    m = mismatch_metrics(p, p.clone(), mask, "tis", 1.01)
    assert m["rollout/logprob_diff_max"] == 0.0 and m["rollout/seq_ratio_p95"] == 1.0


def test_row_seeds_depend_on_the_row_alone():
    u = torch.rand(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seeds = row_seeds(u)
    assert len(set(seeds)) == 6
    assert row_seeds(u[2:5]) == seeds[2:5]  # a chunk gets the same seeds as in the whole batch


# ----- the HF engine and the trainer ------------------------------------------------------


SMALL = dict(
    batch_size=8, minibatch_size=8, ppo_epochs=1, response_tokens=8, lr=1e-3, temperature=0.7,
    seed=0,
)  # fmt: skip


def _trainer(tok, arch="gpt2", **config) -> PPOTrainer:
    policy = make_eos_biased_lm(tok, arch, bias=2.0)
    rm = RewardModel(make_tiny_lm(tok, arch, seed=2), tokenizer=tok)
    return PPOTrainer(policy, copy.deepcopy(policy), rm, tok, PPOConfig(**{**SMALL, **config}))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_hf_engine_logprobs_match_the_trainers(tiny_tokenizer, arch, dtype, tolerance):
    """The HF engine samples with the trainer's own model and code: its log-probs (KV cache, one
    token at a time) are the trainer's (whole sequences at once) up to rounding. In fp32 that is
    below 1e-5 (seen: 5e-7). In bf16 the two kinds of pass may round differently, hence the
    looser bound (seen: 5e-7 here too: the logits are float32, --fp32-lm-head)."""
    trainer = _trainer(tiny_tokenizer, arch, dtype=dtype)
    metrics = trainer.step(PROMPTS)
    b = trainer.last_rollout
    assert b.engine_logprobs is not None
    assert bool((b.engine_logprobs[b.response_mask == 0] == 0).all())
    assert metrics["rollout/logprob_diff_max"] < tolerance
    assert metrics["rollout/weight_mean"] == 1.0  # auto: no correction with the HF engine
    assert metrics["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)


def _rollout_and_update(tok, correction, shift):
    """One GAE step's rollout; the engine's log-probs set to the trainer's + `shift` per token (an
    engine that over-rates every sampled token by e^shift); then the update. Returns its stats."""
    trainer = _trainer(tok, rollout_correction=correction, rollout_correction_cap=8.0)
    b = trainer.rollout(PROMPTS)
    b.engine_logprobs = (b.logprobs + shift) * b.response_mask
    return trainer.update(b)


def test_tis_scales_the_policy_loss_by_the_truncated_ratio(tiny_tokenizer):
    """p / q = e^-log4 = 1/4 on every token: the policy loss of one full-batch minibatch is
    exactly a quarter of the uncorrected one; an over-rating of e^3 = 20 is truncated at 8."""
    none = _rollout_and_update(tiny_tokenizer, "none", math.log(4.0))
    tis = _rollout_and_update(tiny_tokenizer, "tis", math.log(4.0))
    assert tis["loss/policy"] == pytest.approx(none["loss/policy"] / 4, rel=1e-5)
    under = _rollout_and_update(tiny_tokenizer, "tis", -3.0)  # q under-rates: p/q = e^3 > cap
    assert under["loss/policy"] == pytest.approx(none["loss/policy"] * 8.0, rel=1e-5)
    # The diagnostics are the trainer's own: the correction weights the loss only.
    assert tis["policy/first_ratio"] == none["policy/first_ratio"] == pytest.approx(1.0)


def test_mask_drops_sequences_outside_the_band(tiny_tokenizer):
    """An engine off by log 4 on every token is off by far more than log 8 on each sequence of
    several tokens: every sequence is dropped and the policy loss is 0."""
    masked = _rollout_and_update(tiny_tokenizer, "mask", math.log(4.0))
    assert masked["loss/policy"] == 0.0
    kept = _rollout_and_update(tiny_tokenizer, "mask", 1e-4)
    none = _rollout_and_update(tiny_tokenizer, "none", 1e-4)
    assert kept["loss/policy"] == pytest.approx(none["loss/policy"], rel=1e-6)


# ----- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,value,match",
    [
        ("rollout_engine", "sglang", "--rollout-engine must be one of hf, vllm"),
        ("rollout_correction", "is", "--rollout-correction must be one of"),
        ("rollout_correction_cap", 1.0, "--rollout-correction-cap must be a number above 1"),
        ("vllm_gpu_memory_utilization", 1.5, "--vllm-gpu-memory-utilization must be between"),
        ("vllm_sleep_level", 3, "--vllm-sleep-level must be 0, 1 or 2"),
    ],
)
def test_bad_engine_options_are_refused(option, value, match):
    with pytest.raises(ConfigError, match=match):
        PPOConfig(**{option: value}).validate()


def test_vllm_engine_without_vllm_is_one_line_and_exit_2(
    tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    """`rlhf ppo --rollout-engine vllm` where vLLM is not installed: exit 2, one line that says
    how to install it, no traceback, nothing written as a result."""
    from rlhf.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    policy = tmp_path / "policy"
    make_tiny_lm(tiny_tokenizer).save_pretrained(policy)
    tiny_tokenizer.save_pretrained(policy)
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        tmp_path / "rm"
    )
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    code = main([
        "ppo", "--model", str(policy), "--reward-model", str(tmp_path / "rm"),
        "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", "1",
        "--batch-size", "2", "--minibatch-size", "2", "--device", "cpu",
        "--rollout-engine", "vllm",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert "--rollout-engine vllm: vLLM is not installed" in last
    assert "pip install 'rlhf[vllm]'" in last and "--rollout-engine hf" in last
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()
