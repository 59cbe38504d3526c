"""Reward-model ensembles: the combination rules by hand, members that differ and load back, one
copy of the base in memory, `train-reward --ensemble`, and PPO with an ensemble.

Shapes: N members, B batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PROMPTS
from rlhf.cli import main
from rlhf.errors import ConfigError, InputError
from rlhf.models.loading import load_causal_lm
from rlhf.models.lora import LoraArgs
from rlhf.models.reward_ensemble import (
    RewardEnsemble,
    combine_rewards,
    ensemble_metrics,
    load_reward_model,
)
from rlhf.models.reward_model import RewardModel

LORA = LoraArgs(lora_r=4, lora_alpha=8.0)
IDS = torch.tensor([[5, 17, 42, 9], [3, 8, 8, 2], [7, 7, 1, 30]])  # (B, T)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])  # (B, T), right-padded
# Three members (rows) scoring two sequences (columns).
SCORES = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # (N, B)


def _ensemble(model_dir, n=3, seed=0) -> RewardEnsemble:
    """N members on the tiny base whose adapters are not a no-op and whose heads and
    normalisation are not those a fresh ensemble of this seed starts with (drawn from `seed`)."""
    ensemble = RewardEnsemble.from_base(load_causal_lm(model_dir), LORA, n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ensemble.named_parameters():
            if "lora_B" in name or "reward_head" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        for k, member in enumerate(ensemble.members):
            member.set_normalisation(torch.tensor([0.0, 1.0 + k, 3.0]))  # gain, bias per member
    return ensemble.eval()


@pytest.fixture
def ensemble_dir(tmp_path, tiny_tokenizer, tiny_model_dir):
    ensemble = _ensemble(tiny_model_dir)
    ensemble.tokenizer = tiny_tokenizer
    ensemble.save_pretrained(tmp_path / "ens")
    return ensemble, tmp_path / "ens"


# ----- the rules, by hand ---------------------------------------------------------------------
def test_combine_rewards_by_hand():
    # mean: (1 + 3 + 2) / 3 = 2 and (4 + 0 + 2) / 3 = 2.
    torch.testing.assert_close(combine_rewards(SCORES, "mean"), torch.tensor([2.0, 2.0]))
    # min: the worst member of each column.
    torch.testing.assert_close(combine_rewards(SCORES, "min"), torch.tensor([1.0, 0.0]))
    # uwo, population variance: ((1-2)^2 + (3-2)^2 + 0) / 3 = 2/3 and (4 + 4 + 0) / 3 = 8/3;
    # with lambda 0.5: 2 - 1/3 = 5/3 and 2 - 4/3 = 2/3.
    uwo = combine_rewards(SCORES, "uwo", uncertainty_coef=0.5)
    torch.testing.assert_close(uwo, torch.tensor([5 / 3, 2 / 3]))
    mean = combine_rewards(SCORES, "mean")
    assert (combine_rewards(SCORES, "min") <= mean).all() and (uwo <= mean).all()
    torch.testing.assert_close(combine_rewards(SCORES, "uwo", 0.0), mean)  # lambda 0: the mean
    one = SCORES[:1]  # (1, B): one member has variance 0, so every rule gives its scores
    for rule in ("mean", "min", "uwo"):
        torch.testing.assert_close(combine_rewards(one, rule, 3.0), one[0])
    with pytest.raises(ValueError, match="rule must be one of"):
        combine_rewards(SCORES, "max")


def test_ensemble_metrics_by_hand():
    metrics = ensemble_metrics(SCORES)
    # std over members: sqrt(2/3) and sqrt(8/3); range: 3 - 1 = 2 and 4 - 0 = 4.
    expected_std = ((2 / 3) ** 0.5 + (8 / 3) ** 0.5) / 2
    assert metrics["reward/ensemble_std"] == pytest.approx(expected_std)
    assert metrics["reward/ensemble_range"] == pytest.approx(3.0)
    # each member's mean over the rows: (1 + 4) / 2, (3 + 0) / 2, (2 + 2) / 2.
    assert [metrics[f"reward/member{k}"] for k in range(3)] == pytest.approx([2.5, 1.5, 2.0])


def test_forward_combines_by_the_rule_and_keeps_the_member_scores(tiny_model_dir):
    ensemble = _ensemble(tiny_model_dir)
    with torch.no_grad():
        scores = ensemble.member_scores(IDS, MASK)  # (N, B)
        for rule, coef in (("mean", 0.0), ("min", 0.0), ("uwo", 0.7)):
            ensemble.rule, ensemble.uncertainty_coef = rule, coef
            expected = combine_rewards(scores, rule, coef)  # (B,)
            torch.testing.assert_close(ensemble(IDS, MASK), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(ensemble.last_member_scores, scores, atol=1e-6, rtol=0)
        ensemble.pop_metrics()
        # Metrics over rows scored in two chunks are those over the whole batch.
        ensemble(IDS[:2], MASK[:2])
        ensemble(IDS[2:], MASK[2:])
    popped = ensemble.pop_metrics()
    assert popped == pytest.approx(ensemble_metrics(scores), abs=1e-6)
    assert ensemble.pop_metrics() == {}  # read once


# ----- members, saving and memory -------------------------------------------------------------
def test_members_differ(tiny_model_dir):
    """At the start (adapters still a no-op) the heads differ by seed; adapters too."""
    ensemble = RewardEnsemble.from_base(load_causal_lm(tiny_model_dir), LORA, 2, seed=0).eval()
    with torch.no_grad():
        scores = ensemble.member_scores(IDS, MASK)  # (N, B)
    assert (scores[0] - scores[1]).abs().min() > 1e-4
    heads = [m.reward_head.weight for m in ensemble.members]
    assert not torch.equal(heads[0], heads[1])
    a = {n: p for n, p in ensemble.base_model.named_parameters() if "lora_A" in n}
    name0 = next(n for n in a if ".member0." in n)
    assert not torch.equal(a[name0], a[name0.replace(".member0.", ".member1.")])
    # The same seed gives the same ensemble.
    again = RewardEnsemble.from_base(load_causal_lm(tiny_model_dir), LORA, 2, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.member_scores(IDS, MASK), scores, atol=0, rtol=0)


def test_save_and_load_give_the_same_scores(ensemble_dir):
    ensemble, folder = ensemble_dir
    assert json.loads((folder / "ensemble.json").read_text())["members"] == [
        "member0", "member1", "member2",
    ]  # fmt: skip
    loaded = load_reward_model(folder, rule="uwo", uncertainty_coef=0.5)
    assert isinstance(loaded, RewardEnsemble) and loaded.rule == "uwo" and len(loaded) == 3
    ensemble.rule, ensemble.uncertainty_coef = "uwo", 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.member_scores(IDS, MASK), ensemble.member_scores(IDS, MASK), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(loaded(IDS, MASK), ensemble(IDS, MASK), atol=1e-6, rtol=0)
    assert load_reward_model(folder).rule == "mean"  # the saved rule when none is given
    # A plain RewardModel loader says in one line which loader to use.
    with pytest.raises(InputError, match="load_reward_model") as info:
        RewardModel.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_one_copy_of_the_base_weights(ensemble_dir, tiny_model_dir):
    _, folder = ensemble_dir
    base = load_causal_lm(tiny_model_dir)
    for ensemble in (_ensemble(tiny_model_dir), load_reward_model(folder)):
        shared = {
            p.data_ptr()
            for n, p in ensemble.named_parameters()
            if "lora_" not in n and "reward_head" not in n
        }
        assert len(shared) == len(list(base.parameters()))  # one tensor per base weight
        adapters = sum(p.numel() for n, p in ensemble.named_parameters() if "lora_" in n)
        heads = sum(p.numel() for n, p in ensemble.named_parameters() if "reward_head" in n)
        total = sum(p.numel() for p in ensemble.parameters())
        assert total == sum(p.numel() for p in base.parameters()) + adapters + heads
        assert heads == 3 * (base.config.n_embd + 1)
        own = [sum(p.numel() for p in ensemble.member_parameters(k)) for k in range(3)]
        assert own[0] == own[1] == own[2] and sum(own) == adapters + heads


@pytest.mark.parametrize("damage", ["missing_adapter", "damaged_head"])
def test_a_damaged_member_is_one_line(ensemble_dir, damage):
    _, folder = ensemble_dir
    if damage == "missing_adapter":
        (folder / "member1" / "adapter_model.safetensors").unlink()
        message = "member1/adapter_model.safetensors: missing"
    else:
        (folder / "member2" / "reward_head.safetensors").write_bytes(b"not safetensors")
        message = "member2/reward_head.safetensors: cannot read"
    with pytest.raises(InputError, match=message) as info:
        load_reward_model(folder)
    assert "\n" not in str(info.value)


# ----- precision ------------------------------------------------------------------------------
def test_bf16_scores_are_close_to_float32_and_heads_stay_float32(tiny_model_dir):
    """As the trainer freezes it: base matmul weights in bf16, every head float32. The uwo scores
    here reach 2.4 in magnitude; under bf16 autocast they stay within 0.1 of float32's (about 4%
    of the largest; measured: 0.033). bf16 keeps 8 bits of mantissa, a relative error near 4e-3
    per product, through two small layers, and uwo adds the variance of three such scores."""
    from rlhf.models.forward import autocast
    from rlhf.rl.trainer import _freeze

    ensemble = _ensemble(tiny_model_dir)
    ensemble.rule, ensemble.uncertainty_coef = "uwo", 0.5
    with torch.no_grad():
        fp32 = ensemble(IDS, MASK)  # (B,)
    _freeze(ensemble, torch.bfloat16)
    assert all(m.reward_head.weight.dtype == torch.float32 for m in ensemble.members)
    assert any(p.dtype == torch.bfloat16 for p in ensemble.base_model.parameters())
    with torch.no_grad(), autocast(IDS.device, torch.bfloat16):
        bf16 = ensemble(IDS, MASK)  # (B,)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0)


# ----- train-reward --ensemble ----------------------------------------------------------------
def _write_prefs(path) -> None:
    rows = [
        {"prompt": "the acting was", "chosen": "superb and moving .", "rejected": "dull ."},
        {"prompt": "this phone", "chosen": "is great .", "rejected": "broke after a week ."},
        {"prompt": "the plot", "chosen": "was moving .", "rejected": "was dull ."},
        {"prompt": "the blender", "chosen": "works well .", "rejected": "is loud and broke ."},
    ] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(params=[[], ["--ensemble-bootstrap"]], ids=["same-pairs", "bootstrap"])
def trained_ensemble(request, tmp_path, tiny_model_dir):
    prefs = tmp_path / "prefs.jsonl"
    _write_prefs(prefs)
    out = tmp_path / "rm-run"
    argv = [
        "train-reward", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(out),
        "--ensemble", "2", "--lora-r", "4", "--epochs", "2", "--batch-size", "4", "--lr", "3e-3",
        "--eval-fraction", "0.25", "--normalise-samples", "8", "--response-tokens", "6",
        "--normalise-response-tokens", "6", *request.param,
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_train_reward_ensemble_writes_a_loadable_ensemble(trained_ensemble):
    out = trained_ensemble
    result = json.loads((out / "reward_eval.json").read_text())
    assert result["ensemble"] == 2 and len(result["member_accuracy"]) == 2
    assert {"accuracy", "loss", "gain", "bias"} <= set(result["members"][0])
    assert 0 <= result["accuracy"] <= 1  # the ensemble mean's
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("reward/member") for r in logged if "reward/loss" in r} == {0, 1}
    ensemble = load_reward_model(out)  # the run folder: its reward_model/ inside
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble) == 2
    with torch.no_grad():
        scores = ensemble.member_scores(IDS, MASK)  # (N, B)
    assert (scores[0] - scores[1]).abs().max() > 1e-3  # the members differ
    gains = [m["gain"] for m in result["members"]]
    assert gains[0] != gains[1]  # each its own normalisation
    assert [float(m.reward_gain) for m in ensemble.members] == pytest.approx(gains)


def test_bad_ensemble_training_options_are_one_line(tmp_path, tiny_model_dir, capsys):
    prefs = tmp_path / "prefs.jsonl"
    _write_prefs(prefs)
    common = ["train-reward", "--model", str(tiny_model_dir), "--data", str(prefs)]
    for extra, message in (
        (["--ensemble", "0"], "--ensemble must be at least 1"),
        (["--ensemble", "2", "--freeze-base"], "cannot go with --freeze-base"),
        (["--ensemble-bootstrap"], "--ensemble-bootstrap needs --ensemble 2"),
    ):
        assert main([*common, "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


# ----- PPO with an ensemble -------------------------------------------------------------------
def _ppo_argv(model_dir, rm_dir, prompts, out, *extra) -> list[str]:
    return [
        "ppo", "--model", str(model_dir), "--reward-model", str(rm_dir), "--prompts", str(prompts),
        "--out", str(out), "--steps", "2", "--batch-size", "4", "--minibatch-size", "2",
        "--response-tokens", "6", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward-ensemble", "min"], "is a single model"),
        # The default is auto; mean given by name asks for an ensemble too.
        (["--reward-ensemble", "mean"], "--reward-ensemble mean combines the members"),
        (["--reward-ensemble", "uwo", "--uncertainty-coef", "0.5"], "is a single model"),
        (["--uncertainty-coef", "0.5"], "in --reward-ensemble uwo only"),
        (["--reward-ensemble", "uwo", "--uncertainty-coef", "-1"], "--uncertainty-coef must be"),
    ],
)
def test_ppo_refuses_ensemble_options_without_an_ensemble(
    tmp_path, ppo_inputs, capsys, extra, message
):
    model_dir, rm_dir, prompts = ppo_inputs
    assert main(_ppo_argv(model_dir, rm_dir, prompts, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_ppo_loader_refuses_a_rule_for_a_single_model(ppo_inputs):
    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.inputs import load_run

    model_dir, rm_dir, prompts = ppo_inputs
    cfg = PPORunConfig(
        model=str(model_dir), reward_model=str(rm_dir), prompts=str(prompts), reward_ensemble="min"
    )
    with pytest.raises(ConfigError, match="--reward-ensemble min combines the members"):
        load_run(cfg, progress=False)


def test_ppo_with_an_ensemble_logs_its_disagreement(tmp_path, ensemble_dir, tiny_model_dir):
    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.inputs import load_run

    _, folder = ensemble_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    extra = ["--reward-ensemble", "uwo", "--uncertainty-coef", "0.5"]
    out = tmp_path / "run"
    assert main(_ppo_argv(tiny_model_dir, folder, prompts, out, *extra)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["reward/ensemble_std"] > 0 and row["reward/ensemble_range"] > 0
        members = [row[f"reward/member{k}"] for k in range(3)]
        # uwo <= mean of the members, on every row and so on average.
        assert row["objective/reward"] <= sum(members) / 3 + 1e-6
    cfg = PPORunConfig(
        model=str(tiny_model_dir), reward_model=str(folder), prompts=str(prompts),
        reward_ensemble="min",
    )  # fmt: skip
    reward_model = load_run(cfg, progress=False).reward_model
    assert isinstance(reward_model, RewardEnsemble) and reward_model.rule == "min"
    # The default, auto, combines an ensemble by its mean, whatever rule the folder saved.
    spec = json.loads((folder / "ensemble.json").read_text())
    (folder / "ensemble.json").write_text(json.dumps({**spec, "rule": "min"}))
    cfg.reward_ensemble = "auto"
    assert load_run(cfg, progress=False).reward_model.rule == "mean"
    cfg.reward_ensemble, cfg.value_model = "mean", "reward"
    with pytest.raises(ConfigError, match="--value-model reward"):
        load_run(cfg, progress=False)


def test_par_reference_rows_stay_out_of_the_disagreement(tiny_tokenizer, tiny_model_dir):
    """With PAR shaping the ensemble also scores the reference's responses; the disagreement
    logged (and watched by the alarm) covers the policy's rows only."""
    import copy

    from conftest import make_tiny_lm
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.trainer import PPOTrainer

    ensemble = _ensemble(tiny_model_dir)
    ensemble.tokenizer = tiny_tokenizer
    policy = make_tiny_lm(tiny_tokenizer)
    cfg = PPOConfig(
        batch_size=4, minibatch_size=4, ppo_epochs=1, response_tokens=6, dtype="float32",
        reward_shaping="par", par_samples=2,
    )  # fmt: skip
    trainer = PPOTrainer(policy, copy.deepcopy(policy), ensemble, tiny_tokenizer, cfg)
    recorded = []
    real = ensemble._record
    ensemble._record = lambda scores: recorded.append(scores.shape[1]) or real(scores)
    metrics = trainer.step(PROMPTS[:4])
    assert sum(recorded) == 4  # the 4 policy rows, not the 8 reference responses
    assert metrics["reward/ensemble_std"] > 0
