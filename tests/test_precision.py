"""bf16 without silent error: what a `--dtype bfloat16` run computes in which dtype.

The matrix products run in bf16 under autocast; the frozen matmul weights are stored in bf16;
embeddings, norms, the residual stream, the heads, the log-probs and every trained weight stay
float32. Each test here failed on the code before this was so (checked by running it there).

Shapes: B batch, T tokens, R response tokens, V vocabulary, H hidden size.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import PROMPTS, make_eos_biased_lm, make_tiny_lm
from rlhf.core import group_normalised_advantages, rloo_advantages
from rlhf.errors import ConfigError, InputError
from rlhf.models.forward import autocast, cast_frozen, float32_lm_head
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer

SMALL = dict(batch_size=8, minibatch_size=8, ppo_epochs=1, response_tokens=8, steps=10, lr=1e-3)


def _loud_lm(tok, arch: str = "gpt2", seed: int = 0):
    """A tiny model with weights ten times the usual scale: confident logits, whose bf16 rounding
    errors are large enough to see (at the usual 0.02 the whole model is nearly uniform)."""
    lm = make_tiny_lm(tok, arch, seed=seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return lm


def _trainer(tok, arch="gpt2", policy=None, **config) -> PPOTrainer:
    policy = policy if policy is not None else _loud_lm(tok, arch)
    reward_model = RewardModel(make_tiny_lm(tok, arch, seed=2), tokenizer=tok)
    return PPOTrainer(
        policy, copy.deepcopy(policy), reward_model, tok, PPOConfig(**{**SMALL, **config})
    )


def _step0_kl(trainer: PPOTrainer) -> tuple[float, float]:
    """KL per sequence (k1, summed over tokens, batch mean) and the largest per-token gap."""
    b = trainer.rollout(PROMPTS)
    gap = (b.logprobs - b.ref_logprobs) * b.response_mask  # (B, R)
    return gap.sum(1).mean().item(), gap.abs().max().item()


# ----- 1. the reference computes what the policy computes -------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_reference_that_copies_the_policy_has_zero_kl_at_step_0(tiny_tokenizer, arch):
    """The reference is a copy of the policy: in bf16 as in fp32 its log-probs must be the
    policy's. (A bf16-stored reference kept its embeddings and residual stream in bf16 while the
    fp32 policy's stayed fp32: KL 0.05 per sequence on the built-in task, here about 1e-2.)"""
    kl, gap = _step0_kl(_trainer(tiny_tokenizer, arch, dtype="bfloat16"))
    assert abs(kl) <= 1e-4 and gap <= 1e-4, (kl, gap)
    assert _step0_kl(_trainer(tiny_tokenizer, arch, dtype="float32")) == (0.0, 0.0)


def test_bf16_run_from_model_folders_has_zero_kl_at_step_0(ppo_inputs, tmp_path):
    """The same through `rlhf ppo`, which reads the reference from its folder (the path users
    take): step 0's logged objective/kl."""
    from rlhf.cli import main

    model_dir, rm_dir, prompts = ppo_inputs
    loud = tmp_path / "loud"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _loud_lm(tok).save_pretrained(loud)
    tok.save_pretrained(loud)
    out = tmp_path / "run"
    args = [
        "ppo", "--model", str(loud), "--reward-model", str(rm_dir), "--prompts", str(prompts),
        "--out", str(out), "--steps", "1", "--batch-size", "8", "--minibatch-size", "8",
        "--response-tokens", "8", "--device", "cpu", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["objective/kl"]) <= 1e-4, row["objective/kl"]


def test_frozen_weights_are_bf16_only_where_autocast_rounds_them_anyway(tiny_tokenizer):
    """cast_frozen stores the linear layers' weights in bf16 and leaves the embeddings, norms and
    a tied LM head in float32: those are what autocast does not round."""
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16")
    ref = trainer.ref_model
    by_name = {name: p.dtype for name, p in ref.named_parameters()}
    assert by_name["transformer.h.0.attn.c_attn.weight"] == torch.bfloat16
    assert by_name["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16
    assert by_name["transformer.wte.weight"] == torch.float32  # tied to the LM head
    assert by_name["transformer.ln_f.weight"] == torch.float32
    rm = trainer.reward_model
    assert rm.reward_head.weight.dtype == torch.float32  # heads are never rounded
    # Nearly all of the weights' bytes are matmul weights once a model is wide; here, at H = 32,
    # at least the transformer blocks' linear layers are halved.
    assert by_name["transformer.h.1.attn.c_proj.weight"] == torch.bfloat16


def test_cast_frozen_leaves_trained_weights_and_float32_alone(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer)
    cast_frozen(lm, torch.bfloat16)  # nothing is frozen: nothing changes
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    lm.requires_grad_(False)
    cast_frozen(lm, torch.float32)
    assert {p.dtype for p in lm.parameters()} == {torch.float32}


# ----- 2. every trained parameter is float32 -------------------------------------------------


def _optimizer_dtypes(trainer: PPOTrainer) -> set[torch.dtype]:
    return {p.dtype for group in trainer.optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("value_model", ["shared", "reward"])
def test_every_trained_parameter_is_float32_under_bf16(tiny_tokenizer, value_model):
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16", value_model=value_model)
    assert _optimizer_dtypes(trainer) == {torch.float32}
    if value_model == "reward":
        assert {p.dtype for p in trainer.value_model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    "options",
    [dict(), dict(value_model="reward"), dict(advantage_estimator="grpo", samples_per_prompt=2)],
)
def test_first_ratio_is_one_in_bf16(tiny_tokenizer, options):
    """The log-probs the update recomputes are the rollout's, to the bit, in bf16 as in fp32."""
    options = {"ppo_epochs": 2, "minibatch_size": 4, **options}
    for dtype in ("float32", "bfloat16"):
        trainer = _trainer(tiny_tokenizer, dtype=dtype, **options)
        prompts = PROMPTS[:4] if "samples_per_prompt" in options else PROMPTS
        assert trainer.step(prompts)["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_a_bf16_policy_is_trained_in_float32(tiny_tokenizer):
    """A policy handed over in bf16 (transformers 5 keeps a bf16 checkpoint's dtype) is trained
    on float32 master weights: AdamW on bf16 weights rounds small steps away."""
    policy = make_tiny_lm(tiny_tokenizer).to(torch.bfloat16)
    trainer = _trainer(tiny_tokenizer, policy=policy, dtype="bfloat16")
    assert _optimizer_dtypes(trainer) == {torch.float32}


def test_the_separate_critic_moves_every_weight_at_a_small_learning_rate(tiny_tokenizer):
    """One step at lr 1e-6: AdamW's first step moves each weight with a gradient by about the
    learning rate. On bf16 weights (spacing 1.5e-4 near 0.03) 72% of them stayed as they were."""
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16", value_model="reward", lr=1e-6)
    blocks = {
        n: p.detach().clone()
        for n, p in trainer.value_model.named_parameters()
        if ".h." in n and n.endswith("weight") and p.dim() == 2
    }
    trainer.step(PROMPTS)
    after = dict(trainer.value_model.named_parameters())
    moved = [(after[n] != before).float().mean().item() for n, before in blocks.items()]
    assert min(moved) > 0.95, moved


def test_a_bf16_checkpoint_loads_in_float32(tmp_path, tiny_tokenizer):
    from rlhf.models.loading import load_causal_lm

    make_tiny_lm(tiny_tokenizer).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in load_causal_lm(tmp_path / "bf16").parameters()} == {torch.float32}


# ----- 6. the heads run in float32 -------------------------------------------------------------


def test_lm_and_value_heads_give_float32_outputs_under_bf16(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16")
    ids = torch.tensor([tiny_tokenizer("the plot was dull .")["input_ids"]])  # (1, T)
    mask = torch.ones_like(ids)
    lm = trainer.policy.lm
    with torch.no_grad(), autocast(ids.device, torch.bfloat16):
        logits, values = trainer.policy(ids, mask)  # (1, T, V), (1, T)
        hidden = lm.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, T, H)
    assert logits.dtype == values.dtype == torch.float32
    exact = hidden.float() @ lm.lm_head.weight.float().T  # (1, T, V), float32
    assert (logits - exact).abs().max().item() < 1e-5
    # What the head gave in bf16: about 1e-2 away for logits of this size.
    assert (exact.bfloat16().float() - exact).abs().max().item() > 1e-3


def test_no_fp32_lm_head_leaves_the_head_to_autocast(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer, dtype="bfloat16", fp32_lm_head=False)
    ids = torch.tensor([tiny_tokenizer("the plot")["input_ids"]])  # (1, T)
    with torch.no_grad(), autocast(ids.device, torch.bfloat16):
        logits, _ = trainer.policy(ids, torch.ones_like(ids))
    assert logits.dtype == torch.bfloat16
    kl, gap = _step0_kl(trainer)
    assert abs(kl) <= 1e-4 and gap <= 1e-4  # still the same function on both sides


def test_a_float32_head_survives_a_deep_copy(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer)
    assert float32_lm_head(lm)
    twin = copy.deepcopy(lm)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), autocast(ids.device, torch.bfloat16):
        assert twin(input_ids=ids).logits.dtype == torch.float32
    assert twin.lm_head.forward.__self__ is twin.lm_head  # bound to the copy, not the original


# ----- 4. Dr. GRPO's diagnostics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, aggregation",
    [
        ("grpo", "seq-mean-token-mean"),
        ("dr_grpo", "seq-mean-token-sum-norm"),
        ("dr_grpo", "token-mean"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_diagnostics_are_token_means_whatever_the_loss_aggregation(
    tiny_tokenizer, estimator, aggregation, dtype
):
    """The first minibatch of the first epoch sees the rollout's own policy: its ratio is exactly
    1, its approx-KL and clip fraction 0, and its entropy the token mean of the rollout's. Under
    seq-mean-token-sum-norm the loss weights sum to mean(length) / --response-tokens, not 1
    (first_ratio read 0.833)."""
    from rlhf.core import entropy_from_logprobs, masked_mean

    trainer = _trainer(
        tiny_tokenizer,
        policy=make_eos_biased_lm(tiny_tokenizer, bias=3.0),
        advantage_estimator=estimator,
        samples_per_prompt=2,
        batch_size=4,
        minibatch_size=8,
        loss_aggregation=aggregation,
        dtype=dtype,
    )
    b = trainer.rollout(PROMPTS[:4])
    lengths = b.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # rows of other lengths: the loss weights differ
    with torch.no_grad():
        logits, _ = trainer._policy_forward(b.query_response, b.attention_mask, b.P)
        entropy = entropy_from_logprobs(torch.log_softmax(logits, -1))  # (B, R)
    want = masked_mean(entropy, b.response_mask).item()
    stats = trainer.update(b)
    assert stats["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["policy/approxkl"] == pytest.approx(0.0, abs=1e-9)
    assert stats["policy/clipfrac"] == 0.0
    assert stats["policy/entropy"] == pytest.approx(want, rel=1e-5)


# ----- 5. a group of equal scores -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k, value", [(5, 123.456), (7, 0.7), (3, -1e8), (2, 1e-30)])
def test_a_group_of_equal_scores_gets_advantage_exactly_zero(k, value, dtype):
    """In float32 the group mean of five 123.456s is one ulp off, and GRPO's division by a std of
    about 1e-5 made that |A| = 0.80 (k=7, 0.7: 0.056)."""
    scores = torch.cat([torch.full((k,), value), torch.arange(k) * 1.0]).to(dtype)  # two groups
    for advantages in (
        group_normalised_advantages(scores, k),
        group_normalised_advantages(scores, k, scale_by_std=False),
        rloo_advantages(scores, k),
    ):
        assert torch.equal(advantages[:k], torch.zeros(k, dtype=dtype)), advantages[:k]
        assert advantages[k:].abs().max() > 0.1  # the other group is untouched by the fix


def test_centring_on_the_first_score_keeps_the_numbers(tiny_tokenizer):
    """Worked by hand: scores 1, 2, 4 -> mean 7/3; deviations -4/3, -1/3, 5/3; std sqrt(7/3)."""
    scores = torch.tensor([1.0, 2.0, 4.0])
    dev = torch.tensor([-4 / 3, -1 / 3, 5 / 3])
    torch.testing.assert_close(
        group_normalised_advantages(scores, 3, eps=0.0), dev / (7 / 3) ** 0.5
    )
    torch.testing.assert_close(rloo_advantages(scores, 3), dev * 1.5)  # score - mean of others


# ----- a trained adapter is not its own reference ----------------------------------------------


def test_a_trained_lora_policy_needs_its_reference_given(tiny_tokenizer):
    from rlhf.models.lora import LoraArgs, apply_lora

    rm = RewardModel(make_tiny_lm(tiny_tokenizer, seed=2), tokenizer=tiny_tokenizer)
    fresh = apply_lora(make_tiny_lm(tiny_tokenizer), LoraArgs(lora_r=4))
    PPOTrainer(fresh, None, rm, tiny_tokenizer, PPOConfig(**SMALL))  # B = 0: the base is it
    trained = apply_lora(make_tiny_lm(tiny_tokenizer), LoraArgs(lora_r=4))
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if "lora_B" in n).add_(0.01)
    with pytest.raises(ConfigError, match="adapters are already trained"):
        PPOTrainer(trained, None, rm, tiny_tokenizer, PPOConfig(**SMALL))


# ----- dropout: off in PPO, on where it was asked for ------------------------------------------


def _dropout_lm(tok, arch: str, p: float = 0.1):
    lm = make_tiny_lm(tok, arch)
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
    return lm.train()  # handed over in train mode: the trainer must switch dropout off itself


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_dropout_models_keep_the_first_ratio_at_one_and_checkpointing_exact(
    tiny_tokenizer, arch, lora, dtype
):
    from rlhf.models.lora import LoraArgs, apply_lora

    def policy():
        lm = _dropout_lm(tiny_tokenizer, arch)
        if lora:
            lm = apply_lora(lm, LoraArgs(lora_r=4, lora_dropout=0.1)).train()
        return lm

    def trainer(**options):
        lm = policy()
        ref = None if lora else copy.deepcopy(lm)
        rm = RewardModel(make_tiny_lm(tiny_tokenizer, arch, seed=2), tokenizer=tiny_tokenizer)
        config = PPOConfig(
            **{**SMALL, "ppo_epochs": 2, "minibatch_size": 4, "dtype": dtype, **options}
        )
        return PPOTrainer(lm, ref, rm, tiny_tokenizer, config)

    assert any(
        (isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "attention_dropout", 0) > 0
        for m in policy().modules()
    )
    plain, checkpointed = trainer(), trainer(gradient_checkpointing=True)
    for t in (plain, checkpointed):
        assert t.step(PROMPTS)["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    a = dict(plain.policy.named_parameters())
    for name, p in checkpointed.policy.named_parameters():
        assert (a[name] - p).abs().max().item() < 1e-6, name


def test_ppo_refuses_lora_dropout_in_one_line(ppo_inputs, tmp_path, capsys):
    from rlhf.cli import main

    model_dir, rm_dir, prompts = ppo_inputs
    args = [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts",
        str(prompts), "--out", str(tmp_path / "run"), "--lora-r", "4", "--lora-dropout", "0.1",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-dropout 0.1" in err[0] and "dropout off" in err[0]


def test_dpo_lora_dropout_acts_in_training_steps_only(tmp_path, tiny_tokenizer, monkeypatch):
    """--lora-dropout is on in DPO's training passes and nowhere else: not in the base model
    (its own dropout stays off), not in the held-out evaluation (PEFT left the whole model in
    training mode, so the evaluation ran with dropout on). With it the adapter trains to other
    weights than without; with the same seed, to the same ones again."""
    from safetensors.torch import load_file

    from rlhf.rl import dpo

    model_dir = tmp_path / "dropout-lm"
    lm = _dropout_lm(tiny_tokenizer, "gpt2").eval()  # the base's own dropout: 0.1
    lm.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "the plot", "chosen": " was moving .", "rejected": " was dull ."},
        {"prompt": "this phone", "chosen": " is great .", "rejected": " broke ."},
    ] * 8
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {"train": set(), "eval": set()}
    original = dpo.sequence_logps

    def spy(lm, rows, pad_id, device):
        dropouts = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Dropout)}
        adapter = {m.training for n, m in dropouts.items() if ".lora_dropout." in n}
        base = any(m.training for n, m in dropouts.items() if ".lora_dropout." not in n)
        if torch.is_grad_enabled():
            seen["train"].add((frozenset(adapter), base))
        else:
            seen["eval"].add(base or True in adapter)
        return original(lm, rows, pad_id, device)

    monkeypatch.setattr(dpo, "sequence_logps", spy)

    def adapter(dropout: float, name: str) -> dict:
        cfg = dpo.DPOConfig(
            out=str(tmp_path / name), data=str(pairs), model=str(model_dir), lora_r=4,
            lora_dropout=dropout, lr=1e-2, batch_size=4, eval_fraction=0.25, device="cpu",
            gold=False,
        )  # fmt: skip
        dpo.train_dpo(cfg, progress=False)
        return load_file(str(tmp_path / name / "policy" / "adapter_model.safetensors"))

    on, again = adapter(0.5, "on"), adapter(0.5, "again")
    assert seen["train"] == {(frozenset({True}), False)}  # adapters' dropout on, the base's off
    assert seen["eval"] == {False}  # evaluation and reference passes: no dropout at all
    off = adapter(0.0, "off")
    assert max((off[k] - on[k]).abs().max().item() for k in off) > 1e-4
    assert all(torch.equal(on[k], again[k]) for k in on)


# ----- 3. the separate critic is saved and read back -------------------------------------------


def _critic_run(ppo_inputs, out, *extra) -> list[str]:
    model_dir, rm_dir, prompts = ppo_inputs
    return [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts",
        str(prompts), "--out", str(out), "--batch-size", "8", "--minibatch-size", "4",
        "--response-tokens", "6", "--ppo-epochs", "2", "--lr", "1e-3", "--device", "cpu",
        "--value-model", "reward", "--save-every", "1", *extra,
    ]  # fmt: skip


def _metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_the_separate_critic_is_saved_loaded_and_resumed(ppo_inputs, tmp_path):
    from rlhf.cli import main
    from rlhf.models.policy import VALUE_HEAD_FILE, load_policy, load_value_model

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_critic_run(ppo_inputs, whole, "--steps", "3")) == 0
    policy_dir = whole / "policy"
    assert not (policy_dir / VALUE_HEAD_FILE).exists()  # the policy has no head of its own
    critic = load_value_model(policy_dir)
    assert {p.dtype for p in critic.parameters()} == {torch.float32}
    # What was saved is the trained critic: it moved away from the reward model it started as.
    rm = RewardModel.from_pretrained(ppo_inputs[1])
    start = dict(rm.base_model.named_parameters())
    moved = max(
        (p - start[n]).abs().max().item() for n, p in critic.lm.named_parameters() if n in start
    )
    assert moved > 1e-4
    with pytest.raises(InputError, match="separate value network"):
        load_policy(policy_dir)  # a value head of the policy's own is not there to hand back
    load_policy(policy_dir, value_head=False)

    # Resume: 2 steps, then --resume to 3, gives the 3-step run.
    assert main(_critic_run(ppo_inputs, split, "--steps", "2")) == 0
    assert main(_critic_run(ppo_inputs, split, "--steps", "3", "--resume")) == 0
    got, want = _metrics(split), _metrics(whole)
    assert [r["step"] for r in got] == [0, 1, 2]
    for a, b in zip(got, want):
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    again = load_value_model(split / "policy")
    for (n, p), q in zip(again.named_parameters(), critic.parameters()):
        assert torch.equal(p, q), n


def test_a_value_model_that_does_not_fit_is_refused(ppo_inputs, tmp_path):
    from safetensors.torch import save_file

    from rlhf.cli import main
    from rlhf.models.policy import VALUE_HEAD_FILE, VALUE_MODEL_DIR, load_value_model

    out = tmp_path / "run"
    assert main(_critic_run(ppo_inputs, out, "--steps", "1")) == 0
    head = out / "policy" / VALUE_MODEL_DIR / VALUE_HEAD_FILE
    save_file({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, str(head))
    with pytest.raises(InputError, match="does not match"):
        load_value_model(out / "policy")
    with pytest.raises(InputError, match="no separate value model"):
        load_value_model(tmp_path)  # a folder without one
