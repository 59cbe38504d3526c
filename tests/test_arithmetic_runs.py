"""The arithmetic task end to end: `rlhf ppo --task arithmetic` is scored by the strict verifier
with strict accuracy as its gold score and loads no reward model, and `rlhf demo --task
arithmetic` writes its runs, figures and report. A tiny pretrained model stands in for the task's
own, so the tests take seconds."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.task import arithmetic
from rlhf.task import arithmetic_model as am

TINY = am.ArithmeticModelConfig(
    n_examples=4000, n_layer=1, n_embd=32, n_head=2, steps=120, batch_size=64, lr=1e-2,
    eval_prompts=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return am.arithmetic_model_dir(tmp_path_factory.mktemp("cache"), progress=False, config=TINY)


@pytest.fixture
def tiny_task(tiny_dir, monkeypatch):
    """The task's model is the tiny one; a reward model would fail to load."""
    from rlhf.models.reward_model import RewardModel

    monkeypatch.setattr(am, "arithmetic_model_dir", lambda *a, **k: tiny_dir)

    def no_reward_model(*args, **kwargs):
        raise AssertionError("the arithmetic task loaded a reward model")

    monkeypatch.setattr(RewardModel, "from_pretrained", no_reward_model)
    return tiny_dir


def test_ppo_on_the_arithmetic_task_is_scored_by_the_strict_verifier(tmp_path, tiny_task, capsys):
    out = tmp_path / "run"
    argv = ["ppo", "--task", "arithmetic", "--advantage-estimator", "grpo",
            "--samples-per-prompt", "4", "--batch-size", "4", "--minibatch-size", "8",
            "--response-tokens", "8", "--steps", "2", "--sample-every", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["reward/strict"] == row["objective/reward"]  # one term, weight 1
        assert row["objective/gold"] == row["objective/reward"]  # gold: strict accuracy, too
    for s in samples:
        right = arithmetic.solve(s["prompt"])
        assert s["reward"] == float(arithmetic.is_strict_correct(s["response"], right))
        assert s["gold"] == s["reward"]


def test_a_lenient_proxy_can_be_given_instead(tmp_path, tiny_task, capsys):
    out = tmp_path / "run"
    argv = ["ppo", "--task", "arithmetic", "--reward-fn", "rlhf.task.arithmetic:lenient_reward",
            "--advantage-estimator", "rloo", "--samples-per-prompt", "2", "--batch-size", "4",
            "--minibatch-size", "8", "--response-tokens", "8", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    (sample, *_) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    right = arithmetic.solve(sample["prompt"])
    assert sample["reward"] == float(arithmetic.is_lenient_correct(sample["response"], right))
    assert sample["gold"] == float(arithmetic.is_strict_correct(sample["response"], right))


def test_the_arithmetic_demo_writes_its_runs_and_report(tmp_path, tiny_task, capsys, monkeypatch):
    from rlhf.analysis import arithmetic_demo

    real = arithmetic_demo.arithmetic_base

    def small(quick, seed, device, report_to):
        cfg, _ = real(quick, seed, device, report_to)
        import dataclasses

        return dataclasses.replace(cfg, batch_size=4, samples_per_prompt=4, minibatch_size=16), 2

    monkeypatch.setattr(arithmetic_demo, "arithmetic_base", small)
    out = tmp_path / "demo"
    assert main(["demo", "--task", "arithmetic", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Open {out / 'report.md'}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"strict", "with_kl", "no_kl"}
    for name, run in summary["runs"].items():
        assert 0 <= run["held_out"]["strict"] <= run["held_out"]["lenient"] <= 1, name
        assert (out / name / "policy").is_dir() and (out / name / "metrics.jsonl").is_file()
    assert (
        summary["runs"]["no_kl"]["kl_coef"] == 0
        and summary["runs"]["strict"]["verifier"] == "strict"
    )
    report = (out / "report.md").read_text()
    for name in ("arithmetic.png", "hacking.png", "examples.md"):
        assert (out / name).is_file() and name in report
    strict = summary["runs"]["strict"]["held_out"]["strict"]
    assert f"{strict:.3f}" in report  # the table shows the measured numbers
    assert "task: arithmetic" in (out / "config.yaml").read_text()


def test_eval_of_an_arithmetic_run_uses_its_held_out_problems_and_verifier(
    tmp_path, tiny_task, capsys
):
    out = tmp_path / "run"
    argv = ["ppo", "--task", "arithmetic", "--advantage-estimator", "grpo",
            "--samples-per-prompt", "4", "--batch-size", "4", "--minibatch-size", "8",
            "--response-tokens", "8", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(["eval", str(out), "--num-prompts", "16"]) == 0
    capsys.readouterr()
    result = json.loads((out / "eval" / "eval.json").read_text())
    held_out = set(arithmetic.problems("eval"))
    assert len(result["per_prompt"]) == 16
    for row in result["per_prompt"]:
        assert row["prompt"] in held_out
        for side in ("policy", "baseline"):
            right = arithmetic.solve(row["prompt"])
            assert row[f"{side}_gold"] == float(arithmetic.is_strict_correct(row[side], right))
    assert result["models"]["reward_model"] is None  # the verifier judges; no reward model
