"""The main job: `rlhf demo --quick` end to end, the report, and the live hacking detector."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlhf.analysis.hacking import summarise_run
from rlhf.analysis.sweep import fit_functional_form, fit_terms
from rlhf.rl.detector import HackingDetector

SUMMARY_RUN_KEYS = {"reward", "kl", "gold", "distinct_2", "peak_gold"}


# What the quick demo drew, recorded by the fixture: its progress bars, and per figure of
# several runs the colour of each run's line.
SEEN: dict = {"bars": [], "figures": {}}


def _recording(original, record):
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record(result, *args, **kwargs)
        return result

    return wrapper


def _record_figure(fig, histories, path=None, **kwargs):
    colors = {
        line.get_label(): line.get_color()
        for line in fig.axes[0].get_lines()
        if not line.get_label().endswith("(raw)")
    }
    SEEN["figures"][Path(path).name] = colors


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One smoke-sized demo from a cold cache (about 35 s on 2 cores), shared by the tests below."""
    from rlhf import pipeline, tracking
    from rlhf.analysis import plots
    from rlhf.cli import main
    from rlhf.reward import preferences
    from rlhf.reward import train as reward_train
    from rlhf.rl import run

    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    record_bar = lambda bar, *a, **k: SEEN["bars"].append(bar)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        for module in (tracking, run, preferences, reward_train):
            patch.setattr(module, "progress_bar", _recording(module.progress_bar, record_bar))
        for module in (plots, pipeline):
            patch.setattr(module, "plot_runs", _recording(module.plot_runs, _record_figure))
        code = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(root / "cache")])
    assert code == 0
    return out


def test_quick_demo_writes_every_file(quick_demo):
    for name in (
        "report.md",
        "summary.json",
        "hacking.png",
        "kl_coefs.png",
        "comparison.json",
        "examples.md",
    ):
        assert (quick_demo / name).is_file(), name
    for run in ("with_kl", "no_kl", "large_kl", "vanilla_pg"):
        for name in ("metrics.jsonl", "samples.jsonl", "config.json", "reward_kl_tradeoff.png"):
            assert (quick_demo / run / name).is_file(), f"{run}/{name}"
        assert (quick_demo / run / "policy" / "config.json").is_file()


def test_summary_has_the_keys_and_no_kl_drifts_further(quick_demo):
    summary = json.loads((quick_demo / "summary.json").read_text())
    for run in ("with_kl", "no_kl"):
        assert SUMMARY_RUN_KEYS <= set(summary[run]), run
    assert summary["no_kl"]["kl"] > summary["with_kl"]["kl"]
    assert summary["with_kl"]["kl_coef"] == 0.1 and summary["no_kl"]["kl_coef"] == 0.0
    assert 0 <= summary["reward_model"]["accuracy"] <= 1


def test_report_has_both_tables_and_four_answers(quick_demo):
    report = (quick_demo / "report.md").read_text()
    assert "| Step | Reward | KL | Combined | Gold |" in report
    assert "| Step | Reward | KL | Output quality |" in report
    for check in range(1, 5):
        assert f"**Check {check}:" in report
    assert "![with and without KL](hacking.png)" in report
    # Every number in the tables comes from the runs: the first row of the training table is step 0
    # with the logged step-0 reward and KL. (The KL is 0 on the CPU; on CUDA the reference runs in
    # bf16 and the policy in float32, so it is a few thousandths.)
    rows = [
        json.loads(line)
        for line in (quick_demo / "with_kl" / "metrics.jsonl").read_text().splitlines()
    ]
    reward, kl = rows[0]["objective/reward"], rows[0]["objective/kl"]
    assert f"| 0 | {reward:.2f} | {kl:.2f} |" in report


def test_quick_demo_bars_end_full_and_name_each_run(quick_demo):
    bars = {bar.desc.rstrip(": "): bar for bar in SEEN["bars"]}
    for desc, bar in bars.items():
        assert bar.n == bar.total, f"{desc}: {bar.n} of {bar.total}"
    for expected in (
        "pretrain base model",
        "sample and label pairs (3,308 prompts for 3,000 pairs)",
        "train reward model",
        "PPO with the KL penalty (kl_coef 0.1)",
        "PPO without the KL penalty (kl_coef 0)",
        "PPO with a large KL penalty (kl_coef 1)",
        "vanilla policy gradient (kl_coef 0.1)",
    ):
        assert expected in bars, sorted(bars)


def test_kl_zero_has_the_same_colour_in_both_figures(quick_demo):
    def colour_of_kl_zero(figure: str) -> str:
        (colour,) = [
            c
            for label, c in SEEN["figures"][figure].items()
            if re.search(r"kl_coef=0(?![.\d])", label)
        ]
        return colour

    assert colour_of_kl_zero("hacking.png") == colour_of_kl_zero("kl_coefs.png")
    hacking, coefs = SEEN["figures"]["hacking.png"], SEEN["figures"]["kl_coefs.png"]
    assert hacking["with kl (kl_coef=0.1)"] == coefs["kl_coef=0.1"]


def test_readme_python_snippet_runs_as_pasted(quick_demo, monkeypatch, capsys):
    """The README's Python block, run on the quick demo's cached models (the snippet's own
    defaults, the full-size models, would take two minutes to train on a cold cache)."""
    from rlhf.rl import inputs
    from rlhf.task import default

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = "<!-- tests/test_demo.py runs the next code block -->"
    snippet = readme.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    cache = quick_demo.parent / "cache"
    (base,) = cache.glob("base-*")
    (reward,) = cache.glob("reward-*")
    monkeypatch.setattr(default, "base_model_dir", lambda *args, **kwargs: base)
    monkeypatch.setattr(inputs, "default_reward_model_dir", lambda *args, **kwargs: reward)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [f"step {i}" for i in range(10)]
    policy, reference = namespace["policy"].state_dict(), namespace["reference"].state_dict()
    assert any(not torch.equal(policy[k], reference[k]) for k in reference)


def test_demo_quick_gets_its_own_folder(tmp_path, monkeypatch):
    from rlhf import pipeline
    from rlhf.cli import main
    from rlhf.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    folders = []

    def stop(out_dir):
        folders.append(out_dir)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(pipeline, "keep_earlier_report", stop)
    assert main(["demo", "--quick"]) == 2
    assert main(["demo"]) == 2
    assert main(["demo", "--quick", "--out", "elsewhere"]) == 2
    assert folders == [Path("runs/demo-quick"), Path("runs/demo"), Path("elsewhere")]


def test_demo_keeps_an_earlier_report_and_says_so(tmp_path, monkeypatch, capsys):
    import os
    import time

    from rlhf import pipeline
    from rlhf.cli import main
    from rlhf.errors import ConfigError

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("the five-minute results")
    (out / "summary.json").write_text("{}")
    written = time.mktime((2026, 11, 20, 9, 30, 5, 0, 0, -1))
    os.utime(out / "report.md", (written, written))

    def stop(*args, **kwargs):
        raise ConfigError("stopped by the test after the report was put aside")

    monkeypatch.setattr(pipeline, "base_model_dir", stop)
    assert main(["demo", "--out", str(out)]) == 2
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [
        f"{out} held an earlier demo: its report is kept as {out / 'report-20261120-093005.md'} "
        "(numbers in summary-20261120-093005.json); its runs and figures are replaced"
    ]
    assert (out / "report-20261120-093005.md").read_text() == "the five-minute results"
    assert not (out / "report.md").exists()
    # A second earlier report written in the same second gets a name of its own.
    (out / "report.md").write_text("another")
    os.utime(out / "report.md", (written, written))
    assert main(["demo", "--out", str(out)]) == 2
    assert (out / "report-20261120-093005-2.md").read_text() == "another"


def test_hacking_detector_fires_once_when_gold_falls_while_proxy_rises():
    detector = HackingDetector(smooth=0.0, warmup=3, gold_drop=0.1)
    messages = []
    for step in range(30):
        reward = 0.1 * step  # keeps rising
        gold = min(step, 10) * 0.05 - max(0, step - 10) * 0.05  # peaks at step 10, then falls
        msg = detector.update(
            step, {"objective/reward": reward, "objective/gold": gold, "text/distinct_2": 0.6}
        )
        if msg:
            messages.append((step, msg))
    assert len(messages) == 1
    step, msg = messages[0]
    assert step == 13  # gold 0.35 < peak 0.5 - 0.1 first at step 13
    assert "step 13" in msg and "gold score fell" in msg


def test_hacking_detector_is_quiet_when_gold_keeps_up():
    detector = HackingDetector(smooth=0.0, warmup=3)
    for step in range(30):
        # Diversity halves but gold rises: a well-behaved run, not hacking.
        assert (
            detector.update(
                step,
                {
                    "objective/reward": 0.1 * step,
                    "objective/gold": 0.02 * step,
                    "text/distinct_2": 0.6 - 0.01 * step,
                },
            )
            is None
        )


def test_hacking_detector_uses_diversity_without_a_gold_judge():
    detector = HackingDetector(smooth=0.0, warmup=3, diversity_drop=0.75)
    fired = [
        s
        for s in range(30)
        if detector.update(s, {"objective/reward": 0.1 * s, "text/distinct_2": 0.6 - 0.02 * s})
    ]
    # distinct-2 = 0.6 - 0.02 s < 0.75 * 0.6 = 0.45 first at s = 8
    assert fired == [8]


def test_default_diversity_signal_spares_a_healthy_run_and_catches_collapse():
    # Shapes of the demo's runs without a gold judge: with a KL penalty distinct-2 drifts from 0.66
    # to 0.40 as the reviews turn positive; without one it collapses to 0.08.
    def first_warning(final_distinct):
        detector = HackingDetector()
        for s in range(70):
            distinct = 0.66 + (final_distinct - 0.66) * min(s / 40, 1.0)
            if detector.update(s, {"objective/reward": 0.03 * s, "text/distinct_2": distinct}):
                return s
        return None

    assert first_warning(0.40) is None
    step = first_warning(0.08)
    assert step is not None and 20 <= step <= 40


def test_summarise_run_uses_window_means():
    rows = [
        {
            "step": s,
            "objective/reward": float(s),
            "objective/kl": 0.0,
            "objective/gold": float(s % 3),
        }
        for s in range(10)
    ]
    summary = summarise_run(rows)
    assert summary["reward"] == pytest.approx((5 + 6 + 7 + 8 + 9) / 5)
    assert summary["initial_reward"] == 0.0
    assert summary["steps"] == 10


def test_fit_terms_fold_the_sign_of_b():
    assert fit_terms(0.34, 0.14, "log d") == "0.34 - 0.14 log d"
    assert fit_terms(0.314, -0.038, "log d", 3) == "0.314 + 0.038 log d"


def test_functional_form_fits_recover_known_coefficients():
    import math

    d = [0.1 * i for i in range(1, 40)]
    rl = [x * (1.5 - 0.4 * math.log(x)) for x in d]
    bon = [x * (0.8 - 0.3 * x) for x in d]
    assert fit_functional_form(d, rl, "rl") == pytest.approx((1.5, 0.4), abs=1e-9)
    assert fit_functional_form(d, bon, "bon") == pytest.approx((0.8, 0.3), abs=1e-9)


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_ctrl_c_in_demo_or_sweep_does_not_suggest_resume(monkeypatch, capsys, tmp_path, command):
    """Only `rlhf ppo` has --resume; the other commands say what running again will redo."""
    from rlhf import cli, pipeline
    from rlhf.analysis import frontier
    from rlhf.rl.run import Interrupted

    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted after 3 of 70 steps; ... plus --resume")

    monkeypatch.setattr(pipeline, "run_demo", interrupted)
    monkeypatch.setattr(frontier, "frontier_sweep", interrupted)
    assert cli.main([command, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf {command}: interrupted;") and "--resume" not in err, err
    assert "running the same command again redoes only the PPO runs" in err


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0,abc", "--kl-coefs: expected comma-separated numbers"),
        ("0.1,-1", "--kl-coefs: expected one or more numbers >= 0"),
        (",", "--kl-coefs: expected one or more numbers >= 0"),
    ],
)
def test_sweep_rejects_bad_kl_coefs_in_one_line(capsys, tmp_path, value, expected):
    from rlhf import cli

    assert cli.main(["sweep", "--kl-coefs", value, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlhf sweep: error: ") and expected in err
    assert not (tmp_path / "s").exists()


def test_sweep_command_passes_its_options_to_the_sweep(monkeypatch, capsys, tmp_path):
    from rlhf import cli
    from rlhf.analysis import frontier

    seen = {}

    def fake_sweep(plan, out, base):
        seen.update(plan=plan, out=out, seed=base.seed, lr=base.lr)
        return {"methods": {}}

    monkeypatch.setattr(frontier, "frontier_sweep", fake_sweep)
    out = str(tmp_path / "s")
    args = ["sweep", "--kl-coefs", "0, 0.1", "--steps", "5", "--lr", "3e-5", "--seed", "4"]
    args += [
        "--algos",
        "gae,rloo,dpo",
        "--seeds",
        "3",
        "--dpo-betas",
        "0.2",
        "--samples-per-prompt",
        "8",
    ]
    assert cli.main([*args, "--out", out]) == 0
    plan = seen["plan"]
    assert (plan.methods, plan.kl_coefs, plan.dpo_betas) == (
        ["gae", "rloo", "dpo"],
        [0.0, 0.1],
        [0.2],
    )
    assert (plan.seeds, plan.steps, plan.samples_per_prompt) == (3, 5, 8)
    assert (seen["out"], seen["seed"], seen["lr"]) == (out, 4, 3e-5)
    assert "figure:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--algos", "ppo"], "--algos: unknown method 'ppo'"),
        (
            ["--algos", "rloo", "--samples-per-prompt", "1"],
            "--samples-per-prompt 1: a group method",
        ),
        (["--dpo-betas", "x"], "--dpo-betas: expected comma-separated numbers"),
        (["--seeds", "0"], "--seeds must be positive"),
    ],
)
def test_sweep_rejects_bad_options_in_one_line(capsys, tmp_path, argv, expected):
    from rlhf import cli

    assert cli.main(["sweep", *argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "s").exists()


def test_report_sentences_follow_the_numbers(tmp_path):
    from rlhf.analysis.report import _large_kl_sentence, _negative_kl_note, _sample, kl_trend

    flat = [{"step": s, "objective/kl": 2.0 + 0.001 * s} for s in range(20)]
    rising = [{"step": s, "objective/kl": 0.2 * s} for s in range(20)]
    falling = [{"step": s, "objective/kl": 4.0 - 0.2 * s} for s in range(20)]
    assert kl_trend(flat) == "settled at"
    assert kl_trend(rising) == "was still rising at"
    assert kl_trend(falling) == "was falling at"
    assert _negative_kl_note(flat) == ""
    assert "A KL below zero is no bug" in _negative_kl_note(flat, [{"objective/kl": -0.01}])
    held = {"kl": 0.1, "reward": 0.3, "initial_reward": 0.0}
    free = {"kl": 2.0, "reward": 1.2, "initial_reward": 0.0}
    assert _large_kl_sentence(held, free).startswith("The penalty outweighs the reward")
    assert _large_kl_sentence(free, held).startswith("Here the larger coefficient did not")
    # A sample from an earlier step than the row's says which step it is from.
    (tmp_path / "samples.jsonl").write_text(
        '{"step": 0, "prompt": "the plot", "response": "was dull ."}\n'
        '{"step": 10, "prompt": "the film", "response": "was great ."}\n'
    )
    assert _sample(tmp_path, 10) == "the film **was great .**"
    assert _sample(tmp_path, 6) == "(step 0) the plot **was dull .**"
