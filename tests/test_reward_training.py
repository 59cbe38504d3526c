"""Reward-model training end to end: the CLI on a tiny saved model, the tokenizer, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.cli import main
from rlhf.models.reward_model import RewardModel
from rlhf.task.tokenizer import train_tokenizer

PAIRS = [
    ("the acting was", "superb and the story was moving .", "dull and the ending felt weak ."),
    ("this phone", "is great . the battery lasts all day .", "broke after a week ."),
    ("the plot", "was moving and i loved it .", "was dull ."),
    ("the blender", "works well .", "is loud and broke ."),
] * 6


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
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "reward/loss" in r]
    assert {"reward/loss", "reward/accuracy", "reward/margin"} <= set(rows[0])
    assert any("reward/eval_accuracy" in r for r in logged)
    # The pairs are easy and repeated: the trained model must rank the held-out pairs correctly,
    # and its loss must have fallen.
    assert result["accuracy"] == 1.0
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
