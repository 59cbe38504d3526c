"""Defences against over-optimisation: the detector's disagreement alarm on scripted series, its
state across a resume, the built-in ensemble that `--reward-ensemble min` asks for, and
`rlhf sweep --defences` (plan, run names, a tiny sweep with an ensemble and PAR shaping).

Shapes: N members, B batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, make_tiny_lm
from rlhf.analysis.frontier import alarm_table, frontier_sweep, peak_table, run_name
from rlhf.analysis.sweep_config import SweepConfig, SweepPlan
from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.models.loading import load_causal_lm
from rlhf.models.lora import LoraArgs
from rlhf.models.reward_ensemble import RewardEnsemble
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPORunConfig
from rlhf.rl.detector import HackingDetector


def _feed(detector: HackingDetector, series: list[dict]) -> list[tuple[int, str]]:
    """The warnings the detector returns over `series` (one metrics dict per step)."""
    return [(s, m) for s, metrics in enumerate(series) if (m := detector.update(s, metrics))]


def _series(n: int, reward, std=None, gold=None) -> list[dict]:
    rows = []
    for s in range(n):
        row = {"objective/reward": reward(s)}
        if std is not None:
            row["reward/ensemble_std"] = std(s)
        if gold is not None:
            row["objective/gold"] = gold(s)
        rows.append(row)
    return rows


# ----- the disagreement alarm -----------------------------------------------------------------
def test_alarm_fires_at_the_step_worked_out_by_hand():
    detector = HackingDetector(smooth=0.5, warmup=2, disagreement_rise=2.0)
    stds = [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0]
    # EMA, 0.5 * previous + 0.5 * value (the first starts at its value):
    #   step 0: 1, step 1: 1, step 2: 1.5 -> the baseline (the first step >= warmup)
    #   step 3: 1.75, step 4: 2.875 (< 2 x 1.5 = 3), step 5: 3.4375 >= 3 -> fires at step 5.
    # The proxy rises every step, so its EMA is always at its running maximum.
    series = _series(len(stds), reward=lambda s: float(s), std=stds.__getitem__)
    warnings = _feed(detector, series)
    assert [s for s, _ in warnings] == [5]
    assert detector.baseline == pytest.approx(1.5)
    assert detector.fired == {"disagreement": 5} and detector.step == 5
    assert "disagreement rose from 1.500 to 3.438" in warnings[0][1]


def test_alarm_is_quiet_on_flat_series():
    # Flat proxy, flat disagreement.
    flat = _series(40, reward=lambda s: 1.0, std=lambda s: 0.3)
    # Proxy rising, disagreement flat (a healthy run the members keep agreeing on).
    rising = _series(40, reward=lambda s: 0.1 * s, std=lambda s: 0.3 + 0.001 * s)
    # Disagreement rising while the proxy falls: not over-optimisation of the proxy.
    falling = _series(40, reward=lambda s: -0.1 * s, std=lambda s: 0.3 * (1 + s))
    for series in (flat, rising, falling):
        detector = HackingDetector(smooth=0.0, warmup=3)
        assert _feed(detector, series) == [] and detector.fired == {}


def test_the_baseline_is_the_end_of_warmup_not_the_minimum():
    # The members agree more for a while (the policy moves where they are sure), then return to
    # near their starting disagreement: not twice the baseline 1.0 frozen at step 3, though twice
    # the minimum 0.4.
    stds = [1.0] * 4 + [0.4] * 3 + [0.9] * 10
    detector = HackingDetector(smooth=0.0, warmup=3)
    assert _feed(detector, _series(len(stds), reward=float, std=stds.__getitem__)) == []
    assert detector.baseline == 1.0


def test_alarm_fires_on_proxy_up_and_disagreement_up_with_defaults():
    # The members agree at 0.2 for 15 steps, then disagree more each step.
    series = _series(60, reward=lambda s: 0.05 * s, std=lambda s: 0.2 + 0.02 * max(0, s - 15))
    detector = HackingDetector()
    warnings = _feed(detector, series)
    assert len(warnings) == 1 and "ensemble's disagreement" in warnings[0][1]
    assert 25 <= detector.fired["disagreement"] <= 40


def test_each_signal_is_recorded_and_the_warning_is_printed_once():
    # Disagreement doubles by step 8 (smooth 0: the raw values); gold peaks at step 10 and falls
    # 0.1 below it at step 13 (as in test_demo's gold test).
    series = _series(
        30,
        reward=lambda s: 0.1 * s,
        std=lambda s: 0.1 if s < 6 else 0.1 + 0.06 * (s - 6),
        gold=lambda s: min(s, 10) * 0.05 - max(0, s - 10) * 0.05,
    )
    detector = HackingDetector(smooth=0.0, warmup=3)
    warnings = _feed(detector, series)
    # Baseline 0.1 at step 3; 0.1 + 0.06 (s - 6) >= 0.2 first at s = 8 (0.22; 0.16 at 7).
    assert detector.fired == {"disagreement": 8, "gold": 13}
    assert [s for s, _ in warnings] == [8] and detector.step == 8
    assert "gold" not in warnings[0][1]


def test_the_proxy_is_the_unshaped_reward_when_logged():
    # Shaped reward flat (PAR saturates) while the reward model's own score keeps rising.
    series = _series(20, reward=lambda s: 0.9, std=lambda s: 1 + 0.9 * s)
    for s, row in enumerate(series):
        row["reward/unshaped"] = 0.2 * s
    detector = HackingDetector(smooth=0.0, warmup=3)
    # Baseline 3.7 at step 3; 1 + 0.9 s >= 7.4 first at s = 8 (8.2; 7.3 at 7).
    assert [s for s, _ in _feed(detector, series)] == [8]
    # The unshaped reward falling: quiet, whatever the shaped one does.
    for s, row in enumerate(series):
        row["reward/unshaped"], row["objective/reward"] = -0.2 * s, 0.1 * s
    detector = HackingDetector(smooth=0.0, warmup=3)
    assert _feed(detector, series) == []


def test_gold_and_diversity_signals_are_kept():
    gold = _series(
        30, reward=lambda s: 0.1 * s, gold=lambda s: min(s, 10) * 0.05 - max(0, s - 10) * 0.05
    )
    detector = HackingDetector(smooth=0.0, warmup=3)
    assert [s for s, _ in _feed(detector, gold)] == [13] and detector.fired == {"gold": 13}
    diversity = [
        {"objective/reward": 0.1 * s, "text/distinct_2": 0.6 - 0.02 * s} for s in range(30)
    ]
    detector = HackingDetector(smooth=0.0, warmup=3, diversity_drop=0.75)
    assert [s for s, _ in _feed(detector, diversity)] == [8] and detector.fired == {"distinct_2": 8}


# ----- resume ---------------------------------------------------------------------------------
def test_detector_state_round_trips_through_a_checkpoint(tmp_path):
    series = _series(
        30, reward=lambda s: 0.1 * s, std=lambda s: 0.1 if s < 6 else 0.1 + 0.06 * (s - 6),
        gold=lambda s: min(s, 10) * 0.05 - max(0, s - 10) * 0.05,
    )  # fmt: skip
    whole = HackingDetector(smooth=0.5, warmup=3)
    _feed(whole, series)
    first = HackingDetector(smooth=0.5, warmup=3)
    for s in range(10):
        first.update(s, series[s])
    # As run.py saves it: in the checkpoint's state.pt, read back with weights_only.
    torch.save({"detector": first.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["detector"]
    resumed = HackingDetector()
    resumed.load_state_dict(state)
    assert resumed.fired == first.fired and resumed.baseline == first.baseline
    for s in range(10, 30):
        resumed.update(s, series[s])
    assert vars(resumed) == vars(whole)
    assert set(whole.fired) == {"disagreement", "gold"}


def test_an_old_detector_state_without_the_new_fields_loads():
    old = {
        "smooth": 0.8, "warmup": 10, "gold_drop": 0.1, "diversity_drop": 0.5,
        "avg": {"objective/reward": 1.0, "objective/gold": 0.2}, "peak": {"objective/reward": 1.0,
        "objective/gold": 0.4}, "step": 13,
        "message": "reward hacking at step 13: ... but the gold score fell from 0.40 to 0.20; ...",
    }  # fmt: skip
    detector = HackingDetector()
    detector.load_state_dict(old)
    assert detector.fired == {"gold": 13} and detector.baseline is None
    assert detector.disagreement_rise == 2.0
    # It carries on: no second warning, and the disagreement signal takes its baseline now.
    row = {"objective/reward": 2.0, "objective/gold": 0.1, "reward/ensemble_std": 0.3}
    assert detector.update(14, row) is None and detector.baseline == pytest.approx(0.3)
    fresh = HackingDetector()
    fresh.load_state_dict({**old, "step": None, "message": None})
    assert fresh.fired == {}


def test_a_run_from_before_auto_resumes_and_is_found_again(tmp_path):
    """Its config.json says --reward-ensemble mean, the old default, which did what auto does."""
    import dataclasses

    from rlhf.rl.checkpoint import check_resume_options

    old = dataclasses.asdict(PPORunConfig())
    del old["ensemble_members"]
    old["reward_ensemble"] = "mean"
    checkpoint = tmp_path / "checkpoints" / "step_000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps(old))
    check_resume_options(checkpoint, PPORunConfig())  # no change: auto
    # Written since, mean is mean given by name: another run.
    (checkpoint / "config.json").write_text(json.dumps({**old, "ensemble_members": 4}))
    with pytest.raises(ConfigError, match="--reward-ensemble mean -> auto"):
        check_resume_options(checkpoint, PPORunConfig())


# ----- the built-in ensemble ------------------------------------------------------------------
LORA = LoraArgs(lora_r=4, lora_alpha=8.0)


def _save_ensemble(model_dir, tokenizer, folder, n=2) -> None:
    ensemble = RewardEnsemble.from_base(load_causal_lm(model_dir), LORA, n, seed=0)
    with torch.no_grad():
        for name, p in ensemble.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    ensemble.tokenizer = tokenizer
    ensemble.save_pretrained(folder)


@pytest.fixture
def builtin_models(tmp_path, monkeypatch, tiny_tokenizer, tiny_model_dir):
    """The built-in task's models replaced by tiny ones: the base model, and for the reward model
    a single model or an ensemble by the `RewardConfig` asked for (recorded in `asked`)."""
    from rlhf.rl import inputs
    from rlhf.task import default

    single, ensemble = tmp_path / "single", tmp_path / "ensemble"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        single / "reward_model"
    )
    _save_ensemble(tiny_model_dir, tiny_tokenizer, ensemble / "reward_model")
    asked = []

    def fake_reward_dir(cache_dir=None, base_cfg=None, reward_cfg=None, progress=True):
        asked.append(reward_cfg)
        return ensemble if reward_cfg is not None and reward_cfg.ensemble > 1 else single

    monkeypatch.setattr(default, "base_model_dir", lambda *args, **kwargs: tiny_model_dir)
    monkeypatch.setattr(inputs, "default_reward_model_dir", fake_reward_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return asked, prompts


def test_a_rule_without_a_reward_model_asks_for_the_builtin_ensemble(builtin_models):
    from rlhf.rl.inputs import load_run

    asked, prompts = builtin_models
    run = load_run(PPORunConfig(prompts=str(prompts), reward_ensemble="min"), progress=False)
    assert asked[-1].ensemble == 4  # --ensemble-members' default
    assert isinstance(run.reward_model, RewardEnsemble) and run.reward_model.rule == "min"
    cfg = PPORunConfig(
        prompts=str(prompts), reward_ensemble="uwo", uncertainty_coef=0.5, ensemble_members=3
    )
    run = load_run(cfg, progress=False)
    assert asked[-1].ensemble == 3 and run.reward_model.uncertainty_coef == 0.5
    # auto (the default): the built-in single model, as before ensembles.
    run = load_run(PPORunConfig(prompts=str(prompts)), progress=False)
    assert asked[-1].ensemble == 1 and isinstance(run.reward_model, RewardModel)


def test_a_rule_without_any_reward_model_is_refused(builtin_models, capsys):
    _, prompts = builtin_models
    argv = ["ppo", "--prompts", str(prompts), "--reward-ensemble", "min", "--steps", "1"]
    assert main([*argv, "--reward-fn", "rlhf.task.arithmetic:strict_reward"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "this run has no reward model" in err, err
    assert main([*argv, "--ensemble-members", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ensemble-members must be at least 2" in err, err


def test_the_builtin_ensemble_has_its_own_cache_and_trains_once(tmp_path, monkeypatch):
    from rlhf.reward import train
    from rlhf.reward.config import RewardConfig
    from rlhf.rl.inputs import default_reward_model_dir
    from rlhf.task import default

    monkeypatch.setattr(default, "base_model_dir", lambda *args, **kwargs: tmp_path / "base")
    trained = []

    def fake_train(cfg, progress=True):
        trained.append((cfg.ensemble, cfg.model))
        (Path(cfg.out) / "reward_eval.json").write_text("{}")

    monkeypatch.setattr(train, "train_reward", fake_train)
    cache = tmp_path / "cache"
    single = default_reward_model_dir(cache, progress=False)
    ensemble = default_reward_model_dir(cache, reward_cfg=RewardConfig(ensemble=4), progress=False)
    assert trained == [(1, str(tmp_path / "base")), (4, str(tmp_path / "base"))]
    assert single != ensemble and single.parent == ensemble.parent == cache
    # Read back, not trained again; ensemble 1 is the single model's key (earlier caches).
    assert default_reward_model_dir(cache, reward_cfg=RewardConfig(ensemble=4)) == ensemble
    assert default_reward_model_dir(cache, reward_cfg=RewardConfig(ensemble=1)) == single
    assert len(trained) == 2


# ----- rlhf sweep --defences ------------------------------------------------------------------
def test_sweep_plan_reads_defences():
    assert SweepConfig().plan().defences == ["none"]
    plan = SweepConfig(defences="none, min,uwo,shaping", uncertainty_coef=0.5).plan()
    assert plan.defences == ["none", "min", "uwo", "shaping"] and plan.uncertainty_coef == 0.5
    for bad, message in (
        ("none,max", "--defences: unknown defence 'max'"),
        (",", "--defences: got ','"),
        ("min,min", "--defences: got 'min,min'"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            SweepConfig(defences=bad).plan()
        assert "none,mean,min,uwo,shaping" in str(info.value)
    with pytest.raises(ConfigError, match="--uncertainty-coef must be"):
        SweepConfig(defences="uwo", uncertainty_coef=-1).plan()


def test_sweep_refuses_bad_defences_in_one_line(capsys, tmp_path):
    assert main(["sweep", "--defences", "none,ensemble", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlhf sweep: error: --defences:"), err
    assert not (tmp_path / "s").exists()


def test_run_names_are_unchanged_without_a_defence():
    assert run_name("gae", 0.1, 0) == run_name("gae", 0.1, 0, "none") == "gae/kl_0.1/seed_0"
    assert run_name("dpo", 0.03, 1) == "dpo/beta_0.03/seed_1"
    assert run_name("gae", 0.0, 2, "min") == "gae-min/kl_0/seed_2"
    assert run_name("dr_grpo", 0.1, 0, "shaping") == "dr_grpo-shaping/kl_0.1/seed_0"


def test_sweep_with_defences(tmp_path, tiny_tokenizer, tiny_model_dir):
    rm_dir = tmp_path / "rm-run" / "reward_model"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        rm_dir
    )
    ensemble_dir = tmp_path / "ens"
    _save_ensemble(tiny_model_dir, tiny_tokenizer, ensemble_dir)
    base = PPORunConfig(
        model=str(tiny_model_dir), reward_model=str(rm_dir), response_tokens=6, lr=1e-3, gold=True
    )
    plan = SweepPlan(
        methods=["gae"], kl_coefs=[0.0], seeds=1, steps=3, sequences=4,
        defences=["none", "min", "uwo", "shaping"], uncertainty_coef=0.5,
    )  # fmt: skip
    out = tmp_path / "sweep"
    result = frontier_sweep(plan, out=out, base=base, progress=False, ensemble_model=ensemble_dir)
    methods = result["methods"]
    assert list(methods) == ["gae", "gae-min", "gae-uwo", "gae-shaping"]
    assert [(e["method"], e["defence"]) for e in methods.values()] == [
        ("gae", "none"), ("gae", "min"), ("gae", "uwo"), ("gae", "shaping"),
    ]  # fmt: skip
    configs = {
        name: json.loads((out / name / "kl_0" / "seed_0" / "config.json").read_text())
        for name in methods
    }
    assert configs["gae"]["reward_model"] == str(rm_dir)
    assert (
        configs["gae"]["reward_ensemble"] == "auto" and configs["gae"]["reward_shaping"] == "none"
    )
    assert configs["gae-min"]["reward_model"] == str(ensemble_dir)
    assert (configs["gae-min"]["reward_ensemble"], configs["gae-min"]["uncertainty_coef"]) == (
        "min", 0.0,
    )  # fmt: skip
    assert (configs["gae-uwo"]["reward_ensemble"], configs["gae-uwo"]["uncertainty_coef"]) == (
        "uwo", 0.5,
    )  # fmt: skip
    assert (configs["gae-shaping"]["reward_shaping"], configs["gae-shaping"]["par_samples"]) == (
        "par", 1,
    )  # fmt: skip
    # The alarm: only where there is an ensemble; 3 steps are inside warmup, so it never fires.
    for name, entry in methods.items():
        alarm = entry["settings"]["0"].get("alarm")
        if name in ("gae-min", "gae-uwo"):
            assert alarm["fired"] == 0 and alarm["runs"] == 1 and alarm["lead"] is None
        else:
            assert alarm is None
        peak = entry["peak"]
        assert {"gold_end", "kl_end"} <= set(peak)
    table = peak_table(result).splitlines()
    assert len(table) == 2 + len(methods)
    assert "gold at the end" in table[0] and "alarm lead (steps)" in table[0]
    row = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(row) == {
        "PPO (GAE, value head)", "PPO (GAE, value head) + ensemble min",
        "PPO (GAE, value head) + ensemble UWO", "PPO (GAE, value head) + PAR shaping",
    }  # fmt: skip
    assert row["PPO (GAE, value head) + ensemble min"].rstrip(" |").split(" | ")[-3] == "0 of 1"
    assert row["PPO (GAE, value head)"].split(" | ")[-3] == ""  # no ensemble: blank
    alarms = alarm_table(result).splitlines()
    assert len(alarms) == 2 + 2  # the two ensemble runs
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["plan"]["defences"] == plan.defences
    assert saved["methods"]["gae-min"]["settings"]["0"]["alarm"]["alarm_steps"] == [None]
    assert (out / "sweep.png").stat().st_size > 10_000
