"""Reward shaping (`--reward-shaping clip|par`): the transforms by hand, then inside a PPO step.

par is Preference As Reward (Fu et al. 2025): the mean over M reference responses of
sigmoid(r(x, y) - r(x, y_ref)). The reference responses are sampled from the frozen reference
with their own draws, made for the whole batch up front, so chunking changes nothing.

Shapes: B rows, M reference responses per row.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch

from conftest import PROMPTS, make_eos_biased_lm, make_tiny_lm
from rlhf.cli import main
from rlhf.models.reward_model import RewardModel
from rlhf.reward import clip_rewards, par_rewards
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer

SMALL = dict(batch_size=8, minibatch_size=4, ppo_epochs=2, response_tokens=6, steps=10, lr=1e-3)


def _trainer(tok, arch="gpt2", ref=None, **config) -> PPOTrainer:
    policy = make_eos_biased_lm(tok, arch)  # some responses end early: rows of other lengths
    reward_model = RewardModel(make_tiny_lm(tok, arch, seed=2), tokenizer=tok)
    ref = ref if ref is not None else copy.deepcopy(policy)
    return PPOTrainer(policy, ref, reward_model, tok, PPOConfig(**{**SMALL, **config}))


# ----- the transforms, by hand -------------------------------------------------------------


def test_clip_rewards_by_hand():
    scores = torch.tensor([-5.0, -1.0, 0.5, 3.0, 4.0])  # (B,)
    # C = 3: -5 -> -3, 4 -> 3, the rest inside [-3, 3] unchanged (3 is on the bound).
    assert clip_rewards(scores, 3.0).tolist() == [-3.0, -1.0, 0.5, 3.0, 3.0]
    with pytest.raises(ValueError):
        clip_rewards(scores, 0.0)


def test_par_rewards_by_hand():
    scores = torch.tensor([1.0, -1.0])  # (B,)
    ref = torch.tensor([[0.0, 1.0], [1.0, -1.0]])  # (B, M=2)
    # row 0: sigmoid(1 - 0) = 0.7310586, sigmoid(1 - 1) = 0.5; mean 0.6155293
    # row 1: sigmoid(-1 - 1) = sigmoid(-2) = 0.1192029, sigmoid(-1 + 1) = 0.5; mean 0.3096015
    torch.testing.assert_close(
        par_rewards(scores, ref), torch.tensor([0.6155293, 0.3096015]), atol=1e-7, rtol=0
    )
    # One reference each (M = 1): sigmoid(2 - (-1)) = sigmoid(3) = 0.9525741.
    torch.testing.assert_close(
        par_rewards(torch.tensor([2.0]), torch.tensor([[-1.0]])),
        torch.tensor([0.9525741]),
        atol=1e-7,
        rtol=0,
    )
    with pytest.raises(ValueError):
        par_rewards(scores, ref[0])  # (M,), not (B, M)


def test_par_of_a_response_equal_to_its_reference_is_exactly_one_half():
    scores = torch.tensor([-2.5, 0.0, 0.3, 7.0])  # (B,)
    same = scores[:, None].repeat(1, 3)  # (B, 3)
    assert par_rewards(scores, same).tolist() == [0.5] * 4


def test_par_is_bounded_and_increasing_in_the_reward():
    """In (0, 1) and strictly increasing in r for fixed references. (In float32 the sigmoid
    rounds to exactly 1 above a gap of about 17, so the range tested is |r - r_ref| < 14.)"""
    r = torch.linspace(-10.0, 10.0, 401)  # (B,)
    ref = torch.tensor([[-3.0, 0.2, 4.0]]).expand(len(r), 3)  # (B, 3)
    shaped = par_rewards(r, ref)  # (B,)
    assert bool(((shaped > 0) & (shaped < 1)).all())
    assert bool((shaped[1:] > shaped[:-1]).all())


# ----- inside a step ------------------------------------------------------------------------


def test_a_par_step_logs_its_pieces_and_optimises_the_shaped_reward(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, reward_shaping="par", par_samples=2)
    metrics = trainer.step(PROMPTS)
    b = trainer.last_rollout
    assert b.ref_scores.shape == (len(PROMPTS), 2)
    assert torch.equal(b.scores, par_rewards(b.unshaped_scores, b.ref_scores))
    assert bool(((b.scores > 0) & (b.scores < 1)).all())
    assert metrics["objective/reward"] == pytest.approx(b.scores.mean().item(), abs=1e-7)
    assert metrics["reward/reference"] == pytest.approx(b.ref_scores.mean().item(), abs=1e-7)
    # The unshaped reward is the reward model's score here (one term, weight 1).
    assert metrics["reward/unshaped"] == pytest.approx(metrics["reward/reward_model"], abs=1e-6)
    # The policy's samples and unshaped scores are those of a run without shaping (its draws
    # come first), and the references are other samples.
    plain = _trainer(tiny_tokenizer)
    p = plain.rollout(PROMPTS)
    assert p.texts == b.texts and p.unshaped_scores is None and p.ref_scores is None
    torch.testing.assert_close(b.unshaped_scores, p.scores, atol=1e-6, rtol=0)
    assert not torch.equal(b.ref_scores[:, 0], b.ref_scores[:, 1])
    assert "reward/unshaped" not in plain.step(PROMPTS)


def test_the_references_come_from_the_reference_model(tiny_tokenizer):
    """A reference that answers EOS at once gives every row two identical (empty) reference
    responses, so their scores agree; the policy's own samples would not."""
    mute = make_eos_biased_lm(tiny_tokenizer, bias=50.0)
    trainer = _trainer(tiny_tokenizer, ref=mute, reward_shaping="par", par_samples=2)
    b = trainer.rollout(PROMPTS)
    assert torch.equal(b.ref_scores[:, 0], b.ref_scores[:, 1])
    assert any(b.texts), "the policy's responses are not all empty"


def test_clip_step_clamps_the_reward(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, reward_shaping="clip", reward_clip=0.3)
    metrics = trainer.step(PROMPTS)
    b = trainer.last_rollout
    assert bool((b.unshaped_scores.abs() > 0.3).any()), "some scores must be outside the bound"
    assert torch.equal(b.scores, b.unshaped_scores.clamp(-0.3, 0.3))
    assert "reward/reference" not in metrics
    assert metrics["reward/unshaped"] == pytest.approx(b.unshaped_scores.mean().item(), abs=1e-7)


@pytest.mark.parametrize(
    "options",
    [{}, dict(advantage_estimator="grpo", samples_per_prompt=2, batch_size=4)],
    ids=["gae", "grpo-groups-of-2"],
)
def test_par_references_do_not_depend_on_chunking(tiny_tokenizer, options):
    """Chunks of 3 rows (3 + 3 + 2; with groups of 2, one group split) give the reference scores,
    and so the shaped scores, of one pass over the batch: the draws are the global batch's."""
    par = dict(reward_shaping="par", par_samples=2, **options)
    prompts = PROMPTS[: par.get("batch_size", len(PROMPTS))]
    one = _trainer(tiny_tokenizer, **par).rollout(prompts)
    chunked = _trainer(tiny_tokenizer, rollout_batch_size=3, **par).rollout(prompts)
    assert one.texts == chunked.texts
    for name in ("unshaped_scores", "ref_scores", "scores", "advantages"):
        torch.testing.assert_close(getattr(one, name), getattr(chunked, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_par_in_bf16_matches_float32(tiny_tokenizer, arch):
    """bf16 scores the same responses to about 3e-3 (measured 2-3e-3, the reward model's bf16
    rounding); the sigmoid's slope is at most 1/4, so par agrees to 2e-3 (measured 4e-4), and
    stays in (0, 1)."""
    fp32 = _trainer(tiny_tokenizer, arch, reward_shaping="par", par_samples=2).rollout(PROMPTS)
    bf16 = _trainer(
        tiny_tokenizer, arch, reward_shaping="par", par_samples=2, dtype="bfloat16"
    ).rollout(PROMPTS)
    assert fp32.texts == bf16.texts
    assert bool(((bf16.scores > 0) & (bf16.scores < 1)).all())
    torch.testing.assert_close(bf16.ref_scores, fp32.ref_scores, atol=1e-2, rtol=0)
    torch.testing.assert_close(bf16.scores, fp32.scores, atol=2e-3, rtol=0)


# ----- the command line --------------------------------------------------------------------

REWARD_PY = """
import json, os

def length(prompts, completions, answer, **kwargs):
    with open(os.environ["SEEN"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer}) + "\\n")
    return [len(c) / 10 for c in completions]
"""


def test_cli_par_with_a_reward_function(tmp_path, ppo_inputs, monkeypatch, capsys):
    """The reference responses go through the same reward terms, columns included: the function
    is called twice a step, the second time on M=2 references for each of the 4 x 2 rows."""
    model, _, _ = ppo_inputs
    (tmp_path / "rewards.py").write_text(textwrap.dedent(REWARD_PY))
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.jsonl"))
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [
        "ppo", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
        "--reward-fn", f"{tmp_path / 'rewards.py'}:length", "--reward-shaping", "par",
        "--par-samples", "2", "--steps", "2", "--batch-size", "4", "--minibatch-size", "4",
        "--samples-per-prompt", "2", "--advantage-estimator", "rloo", "--response-tokens", "4",
        "--ppo-epochs", "1", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    calls = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    answers = {r["prompt"]: r["answer"] for r in rows}
    assert [len(c["prompts"]) for c in calls] == [8, 16, 8, 16]
    for call in calls:
        assert call["answer"] == [answers[p] for p in call["prompts"]]
    policy_rows, reference_rows = calls[0]["prompts"], calls[1]["prompts"]
    assert reference_rows == [p for p in policy_rows for _ in range(2)]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in logged:
        assert 0 < row["objective/reward"] < 1
        assert row["reward/unshaped"] == pytest.approx(row["reward/length"], abs=1e-6)
        assert row["reward/reference"] >= 0
    assert json.loads((out / "config.json").read_text())["reward_shaping"] == "par"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--reward-clip", "0"], "--reward-clip must be a positive number"),
        (["--reward-shaping", "bogus"], "--reward-shaping: invalid choice: 'bogus'"),
        (["--par-samples", "0"], "--par-samples must be positive"),
    ],
)
def test_bad_shaping_options_are_one_line(capsys, options, message):
    try:
        code = main(["ppo", "--steps", "1", *options])
    except SystemExit as exc:  # argparse refuses a choice itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err, err
