"""Reward-model training end to end: the CLI on a tiny saved model, the tokenizer, bad inputs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rlhf.cli import main
from rlhf.models.reward_model import RewardModel
from rlhf.task.tokenizer import train_tokenizer

PROMPTS = ["the acting was", "this phone", "the plot", "the blender", "i watched this film and",
           "the headphones"]  # fmt: skip
GOOD = ["superb and the story was moving .", "great . the battery lasts all day .",
        "moving and i loved it .", "works well .", "i loved every minute of it .",
        "great and it works well ."]  # fmt: skip
BAD = ["dull and the ending felt weak .", "broke after a week .", "was dull .", "is loud and broke .",
       "weak . i want a refund .", "loud . the ending felt dull ."]  # fmt: skip
# 54 distinct (prompt, chosen, rejected) triples, every 4th of the 216: no pair is repeated, so a
# held-out pair is never also a training pair (the model must rank new combinations).
PAIRS = [
    (PROMPTS[p], GOOD[g], BAD[b])
    for p, g, b in itertools.islice(itertools.product(range(6), repeat=3), 0, None, 4)
]


def _write_pairs(path, fmt="ab"):
    with open(path, "w") as f:
        for i, (p, good, bad) in enumerate(PAIRS):
            if fmt == "ab":
                a, b = (good, bad) if i % 2 == 0 else (bad, good)
                f.write(
                    json.dumps(
                        {
                            "prompt": p,
                            "response_A": a,
                            "response_B": b,
                            "preference": "A" if i % 2 == 0 else "B",
                        }
                    )
                    + "\n"
                )
            else:
                f.write(json.dumps({"prompt": p, "chosen": good, "rejected": bad}) + "\n")


@pytest.mark.parametrize("fmt", ["ab", "chosen_rejected"])
def test_train_reward_cli_on_a_tiny_model(tmp_path, tiny_model_dir, fmt, capsys):
    data = tmp_path / "prefs.jsonl"
    _write_pairs(data, fmt)
    out = tmp_path / "rm"
    code = main([
        "train-reward", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out),
        "--epochs", "8", "--batch-size", "8", "--lr", "3e-3", "--eval-fraction", "0.25",
        "--normalise-samples", "16", "--response-tokens", "8",
    ])  # fmt: skip
    assert code == 0
    assert "held-out accuracy" in capsys.readouterr().out
    result = json.loads((out / "reward_eval.json").read_text())
    assert {"accuracy", "ceiling", "loss", "margin"} <= set(result)
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == str(data) and config["epochs"] == 8
    assert config["max_length"] == 128  # resolved: 256, or the model's 128 positions if lower
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "reward/loss" in r]
    assert {"reward/loss", "reward/accuracy", "reward/margin"} <= set(rows[0])
    assert any("reward/eval_accuracy" in r for r in logged)
    # Held-out pairs are 14 combinations never seen in training (PAIRS has no repeats). Chance
    # would rank at least 13 of 14 correctly with probability 15/16384; measured: 14 of 14.
    assert len(set(PAIRS)) == len(PAIRS) == 54 and result["n_pairs"] == 14
    assert result["accuracy"] >= 13 / 14
    assert rows[-1]["reward/loss"] < rows[0]["reward/loss"]
    # The saved model loads back and the base weights moved (the whole model is fine-tuned).
    from transformers import AutoModelForCausalLM

    rm = RewardModel.from_pretrained(out / "reward_model")
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(
        rm.base_model.transformer.h[0].mlp.c_fc.weight, before.transformer.h[0].mlp.c_fc.weight
    )


def test_result_does_not_depend_on_rng_draws_while_loading(tmp_path, tiny_model_dir, monkeypatch):
    # A cold cache pretrains the base model inside `train_reward`, drawing from the global RNG; a
    # warm cache does not. Simulate that with a loader that draws, and require the same head.
    import rlhf.models.loading as loading
    from rlhf.reward.train import RewardConfig, train_reward

    data = tmp_path / "prefs.jsonl"
    _write_pairs(data)
    real_load = loading.load_causal_lm

    def run(name, draws):
        def load(*args, **kwargs):
            torch.rand(draws)
            return real_load(*args, **kwargs)

        monkeypatch.setattr(loading, "load_causal_lm", load)
        cfg = RewardConfig(
            out=str(tmp_path / name), data=str(data), model=str(tiny_model_dir), epochs=1,
            batch_size=8, normalise_samples=8, response_tokens=4,
        )  # fmt: skip
        train_reward(cfg, progress=False)
        return RewardModel.from_pretrained(tmp_path / name / "reward_model").reward_head.weight

    assert torch.equal(run("warm", 0), run("cold", 1000))


def test_normalisation_uses_the_length_ppo_samples():
    from rlhf.reward.train import RewardConfig
    from rlhf.rl.config import PPOConfig

    assert RewardConfig().normalise_response_tokens == PPOConfig().response_tokens


def test_reference_samples_score_mean_0_std_1_the_way_ppo_scores_them(tmp_path, tiny_model_dir):
    """ppo-details 9: after train_reward, fresh samples of the base (reference) model, drawn and
    scored by PPOTrainer itself, have mean 0 and std 1.

    Sampling error: the gain and bias are fitted on N = 512 samples and checked on M = 512 fresh
    ones, so the difference of means has standard error sqrt(1/N + 1/M) = 0.0625 (in units of the
    std) and the ratio of stds a relative one of about sqrt(1/2N + 1/2M) = 0.044. The bounds are 4
    and 4.5 of those. Measured: mean -0.09, std 0.93. The normalisation fitted as before (40-token
    samples scored through decoded and re-encoded text) gives mean -4.2, std 1.5 here, and 8-token
    samples scored through text mean -1.1, std 0.76.
    """
    import copy

    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.reward.train import RewardConfig, train_reward
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.trainer import PPOTrainer

    data = tmp_path / "prefs.jsonl"
    _write_pairs(data, "chosen_rejected")
    n = 512
    cfg = RewardConfig(
        out=str(tmp_path / "rm"), data=str(data), model=str(tiny_model_dir), epochs=8,
        batch_size=8, lr=3e-3, eval_fraction=0.25, normalise_samples=n,
        normalise_response_tokens=8, device="cpu",
    )  # fmt: skip
    assert cfg.response_tokens != cfg.normalise_response_tokens
    train_reward(cfg, progress=False)
    rm = RewardModel.from_pretrained(tmp_path / "rm" / "reward_model")
    lm = load_causal_lm(tiny_model_dir)
    ppo = PPOConfig(batch_size=n, minibatch_size=n, response_tokens=8, seed=123)
    trainer = PPOTrainer(lm, copy.deepcopy(lm), rm, load_tokenizer(tiny_model_dir), ppo)
    scores = trainer.rollout([PROMPTS[i % len(PROMPTS)] for i in range(n)]).scores  # (M,)
    assert abs(scores.mean().item()) < 0.25, scores.mean()
    assert abs(scores.std().item() - 1) < 0.2, scores.std()


def test_bad_preference_file_gives_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "response_A": "a", "response_B": "b", "preference": "C"}\n'
    )
    out = tmp_path / "rm"
    out.mkdir()
    (out / "keep.txt").write_text("existing output")
    code = main(
        ["train-reward", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "bad.jsonl:2" in err and "preference" in err
    assert (out / "keep.txt").read_text() == "existing output"
    assert not (out / "config.json").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    _write_pairs(data)
    code = main(
        [
            "train-reward",
            "--data",
            str(data),
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "option,value", [("--epochs", "0"), ("--batch-size", "-1"), ("--eval-fraction", "1.5")]
)
def test_bad_option_values(tmp_path, option, value, capsys):
    code = main(["train-reward", "--out", str(tmp_path / "o"), option, value])
    err = capsys.readouterr().err
    assert code == 2 and option in err


def test_tokenizer_is_deterministic_and_pads_with_a_distinct_token():
    texts = ["the acting was superb .", "the plot was dull .", "this phone is great ."] * 30
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab()
    ids = a("the acting was superb .")["input_ids"]
    assert (
        ids[0] == a.bos_token_id
        and a.decode(ids, skip_special_tokens=True) == "the acting was superb ."
    )
    assert a.pad_token_id is not None and a.pad_token_id != a.eos_token_id


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(["the acting was superb .", "the plot was dull ."] * 20, 280)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("the plot was superb .")["input_ids"] == tok("the plot was superb .")["input_ids"]
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_default_task_reward_model_reaches_085(tmp_path):
    """The issue's bar: on the built-in task, held-out accuracy of at least 0.85 (about 3 minutes)."""
    from rlhf.reward.train import RewardConfig, train_reward

    result = train_reward(RewardConfig(out=str(tmp_path / "rm")), progress=False)
    assert result["accuracy"] >= 0.85


def test_base_model_pretraining_is_deterministic():
    """One seed fixes the base model: two builds give identical weights and samples."""
    from rlhf.task.default import BaseModelConfig, pretrain_base_model

    cfg = BaseModelConfig(
        n_reviews=300, steps=5, n_layer=1, n_embd=32, n_head=2, batch_size=16, vocab_size=400
    )
    m1, t1, info1 = pretrain_base_model(cfg, progress=False)
    m2, t2, info2 = pretrain_base_model(cfg, progress=False)
    assert t1.get_vocab() == t2.get_vocab()
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    assert info1["samples"] == info2["samples"]
    assert info1["heldout_perplexity"] == info2["heldout_perplexity"]


def test_preference_dataset_labels_follow_the_gold_judge(tiny_lm, tiny_tokenizer):
    """Deterministic labelling prefers the higher gold score; records use the seed's format."""
    from rlhf.reward.preferences import create_preference_dataset

    records = create_preference_dataset(
        tiny_lm, tiny_tokenizer, prompts=["the acting was", "this phone"] * 8, n_pairs=10,
        label_temperature=0, response_tokens=6, seed=0,
    )  # fmt: skip
    assert 0 < len(records) <= 10
    for r in records:
        assert set(r) >= {"prompt", "response_A", "response_B", "preference"}
        assert r["response_A"] != r["response_B"]
        assert r["preference"] == ("A" if r["gold_A"] >= r["gold_B"] else "B")
