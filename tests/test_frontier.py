"""`rlhf sweep` across methods: every run on one frontier, means and bands over seeds, fits with
R^2, the peak table, and resuming without running a finished run again.

Run on the tiny test model with a tiny reward model and preference file, a few steps each.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_tiny_lm
from rlhf.analysis import frontier
from rlhf.analysis.frontier import SweepPlan, frontier_sweep, peak_table, r_squared
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPORunConfig


def test_r_squared_by_hand():
    d = [1.0, 2.0, 3.0]
    r = [1.0, 2.0, 2.0]  # mean 5/3; total sum of squares 2/3
    # R(d) = d (a - b d) with a = 1, b = 0 predicts 1, 2, 3: residuals 0, 0, 1 -> 1 - 1 / (2/3)
    assert r_squared(d, r, "bon", 1.0, 0.0) == pytest.approx(1 - 1 / (2 / 3))
    exact = [x * (0.5 - 0.2 * math.log(x)) for x in d]
    assert r_squared(d, exact, "rl", 0.5, 0.2) == pytest.approx(1.0)


@pytest.fixture
def sweep_inputs(tmp_path, tiny_tokenizer, tiny_model_dir):
    rm_dir = tmp_path / "rm-run" / "reward_model"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        rm_dir
    )
    pairs = [
        {
            "prompt": "the acting was",
            "chosen": "superb and moving .",
            "rejected": "dull and weak .",
        },
        {"prompt": "this phone", "chosen": "is great .", "rejected": "broke after a week ."},
        {"prompt": "the plot", "chosen": "was clever .", "rejected": "made no sense ."},
    ] * 4
    (rm_dir.parent / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    base = PPORunConfig(
        model=str(tiny_model_dir), reward_model=str(rm_dir), response_tokens=6, lr=1e-3, gold=True
    )
    plan = SweepPlan(
        methods=["gae", "rloo", "dpo", "best_of_n"], kl_coefs=[0.0, 0.1], dpo_betas=[0.1],
        seeds=2, steps=3, sequences=4, samples_per_prompt=2, bon_prompts=4, bon_n_max=4,
    )  # fmt: skip
    return base, plan


def test_sweep_runs_every_method_and_seed_and_resumes(tmp_path, sweep_inputs, monkeypatch):
    base, plan = sweep_inputs
    out = tmp_path / "sweep"
    result = frontier_sweep(plan, out=out, base=base, progress=False)
    methods = result["methods"]
    assert list(methods) == ["gae", "rloo", "dpo", "best_of_n"]
    assert result["seeds"] == [0, 1]
    for method in ("gae", "rloo"):
        for coef in ("0", "0.1"):
            s = methods[method]["settings"][coef]
            assert len(s["per_seed"]) == 2 and len(s["d"]) == 3  # seeds, steps
            a, b = (c["gold"] for c in s["per_seed"])
            assert s["gold"] == pytest.approx([(x + y) / 2 for x, y in zip(a, b)])
            assert s["gold_std"] == pytest.approx([abs(x - y) / math.sqrt(2) for x, y in zip(a, b)])
            cfg = json.loads((out / method / f"kl_{coef}" / "seed_1" / "config.json").read_text())
            k = 2 if method == "rloo" else 1
            assert (cfg["samples_per_prompt"], cfg["batch_size"], cfg["seed"]) == (k, 4 // k, 1)
    assert (out / "dpo" / "beta_0.1" / "seed_0" / "dpo_eval.json").is_file()
    assert methods["best_of_n"]["settings"][""]["n"] == [1, 2, 4]
    for entry in methods.values():
        assert set(entry["fit"]) == {"form", "a", "b", "r2"} and "peak" in entry
    assert "step_s" in methods["rloo"] and "step_s" in methods["gae"]
    table = peak_table(result)
    assert table.count("\n") == 1 + len(methods) and "RLOO" in table and "DPO" in table
    assert (out / "sweep.png").stat().st_size > 10_000
    assert json.loads((out / "sweep.json").read_text())["methods"].keys() == methods.keys()

    # The same sweep again reads every finished run back: nothing trains.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(frontier, "train_ppo", no_training)
    import rlhf.rl.dpo

    monkeypatch.setattr(rlhf.rl.dpo, "train_dpo", no_training)
    again = frontier_sweep(plan, out=out, base=base, progress=False)
    assert (
        again["methods"]["gae"]["settings"]["0.1"]["gold"]
        == methods["gae"]["settings"]["0.1"]["gold"]
    )
    dpo_cfg = json.loads((out / "dpo" / "beta_0.1" / "seed_0" / "config.json").read_text())
    assert dpo_cfg["eval_split"] == "train"  # gold on the prompts PPO's rollouts are scored on


def test_sweep_runs_again_what_other_options_made(tmp_path, sweep_inputs, monkeypatch, capsys):
    import dataclasses

    import rlhf.rl.dpo

    base, plan = sweep_inputs
    plan = dataclasses.replace(plan, methods=["gae", "dpo", "best_of_n"], kl_coefs=[0.1], seeds=1)
    out = tmp_path / "sweep"
    frontier_sweep(plan, out=out, base=base, progress=False)
    capsys.readouterr()

    ran = []
    real_ppo, real_dpo = frontier.train_ppo, rlhf.rl.dpo.train_dpo
    monkeypatch.setattr(
        frontier, "train_ppo", lambda cfg, **kw: ran.append(cfg.out) or real_ppo(cfg, **kw)
    )
    monkeypatch.setattr(
        rlhf.rl.dpo, "train_dpo", lambda cfg, **kw: ran.append(cfg.out) or real_dpo(cfg, **kw)
    )
    bon_file = out / "best_of_n.json"
    bon_before = bon_file.stat().st_mtime_ns
    # A new learning rate: the RL run is made again, and says why; DPO and best-of-n, which do not
    # use it, are read back.
    frontier_sweep(plan, out=out, base=dataclasses.replace(base, lr=2e-3), progress=False)
    run = out / "gae" / "kl_0.1" / "seed_0"
    assert ran == [str(run)]
    assert (
        f"{run}: made with other options (--lr 0.001 -> 0.002); running it again"
        in capsys.readouterr().out
    )
    assert json.loads((run / "config.json").read_text())["lr"] == 2e-3
    assert bon_file.stat().st_mtime_ns == bon_before
    # A new response length changes every method's samples.
    ran.clear()
    frontier_sweep(
        plan, out=out, base=dataclasses.replace(base, lr=2e-3, response_tokens=5), progress=False
    )
    assert ran == [str(run), str(out / "dpo" / "beta_0.1" / "seed_0")]
    assert bon_file.stat().st_mtime_ns != bon_before
