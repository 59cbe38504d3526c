"""Rewards from anything: Python reward functions (TRL's signature) alone or summed with a reward
model, the prompt records' columns reaching them, and every way a function can fail stopping the
run before any weight changes, in one line."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.reward.sources import (
    RewardError,
    RewardFunction,
    Rewards,
    RewardTerm,
    ScoreBatch,
    load_reward_function,
    parse_weights,
)


class Fixed:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def score(self, batch):
        return self.values


def batch(n=3):
    return ScoreBatch(
        prompts=[f"p{i}" for i in range(n)], completions=[f"c{i}" for i in range(n)],
        ended=[True] * n, columns={"answer": [str(i) for i in range(n)]},
    )  # fmt: skip


def test_terms_are_weighted_and_none_means_not_applicable():
    rewards = Rewards([
        RewardTerm(Fixed("a", [1.0, None, 2.0]), 0.5),
        RewardTerm(Fixed("b", [4.0, 3.0, None]), 2.0),
    ])  # fmt: skip
    totals, terms = rewards.score(batch())
    # row 0: 0.5 * 1 + 2 * 4; row 1: only b, 2 * 3; row 2: only a, 0.5 * 2
    assert totals == [8.5, 6.0, 1.0]
    assert terms == [[1.0, None, 2.0], [4.0, 3.0, None]]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, 2.0], "reward f: returned 2 values for 3 rows"),
        ([1.0, float("nan"), 2.0], "reward f: row 1 (prompt 'p1', completion 'c1'): returned nan, not a finite number"),
        ([1.0, float("inf"), 2.0], "row 1 (prompt 'p1', completion 'c1'): returned inf"),
        ([1.0, "high", 2.0], "reward f: row 1 (prompt 'p1'): returned 'high', not a number"),
        ([True, 1.0, 1.0], "row 0 (prompt 'p0'): returned True, not a number"),
        (None, "reward f: returned NoneType None, not a list"),
        ([None, None, 1.0], "row 0 (prompt 'p0'): every reward term returned None (f)"),
    ],
)  # fmt: skip
def test_bad_values_name_the_term_the_row_and_the_value(values, message):
    with pytest.raises(RewardError) as info:
        Rewards([RewardTerm(Fixed("f", values))]).score(batch())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_function_that_raises_is_named_with_its_error():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(
        RewardError,
        match=r"reward broken \(rewards.py:broken\) raised KeyError: 'answer' on a batch of 3 rows",
    ):
        Rewards([RewardTerm(RewardFunction(broken, where="rewards.py:broken"))]).score(batch())


def test_functions_get_trls_arguments_and_the_columns():
    seen = {}

    def with_kwargs(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [0.0] * len(prompts)

    def named_only(completions, answer):  # no **kwargs: only what it names
        return [float(c[1:] == a) for c, a in zip(completions, answer)]

    b = batch()
    b.completion_ids = [[1], [2, 3], []]
    RewardFunction(with_kwargs).score(b)
    assert seen["answer"] == ["0", "1", "2"] and seen["completion_ids"] == [[1], [2, 3], []]
    assert seen["prompts"] == ["p0", "p1", "p2"] and seen["completions"] == ["c0", "c1", "c2"]
    assert RewardFunction(named_only).score(b) == [1.0, 1.0, 1.0]


def test_functions_load_from_a_file_or_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    from_file = load_reward_function(f"{tmp_path / 'my_rewards.py'}:length")
    assert from_file.name == "length" and from_file.score(batch()) == [2.0, 2.0, 2.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_reward_function("my_rewards:length")
    assert from_module.score(batch(2)) == [2.0, 2.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rewards.py", "expected FILE.py:NAME or package.module:NAME"),
        ("missing.py:f", "no such file missing.py"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("{file}:nope", "has no function nope; it has length"),
        ("{bad}:f", "importing"),
    ],
)
def test_bad_specs_are_one_line(tmp_path, spec, message):
    (tmp_path / "r.py").write_text("def length(completions, **kw):\n    return [1.0]\n")
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    spec = spec.format(file=tmp_path / "r.py", bad=tmp_path / "bad.py")
    with pytest.raises(ConfigError, match=message):
        load_reward_function(spec)


def test_weights_one_per_function():
    assert parse_weights(None, 2) == [1.0, 1.0]
    assert parse_weights("0.5,2", 2) == [0.5, 2.0]
    with pytest.raises(ConfigError, match="2 weights for 3 reward function"):
        parse_weights("1,2", 3)
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_weights("1,x", 2)


REWARDS_PY = '''
import json, os

def answer_match(prompts, completions, answer, **kwargs):
    """1 when the completion mentions the record's answer; None for rows without one."""
    with open(os.environ["SEEN"], "a") as fh:
        fh.write(json.dumps({"prompts": prompts, "answer": answer, "ids": kwargs["completion_ids"]}) + "\\n")
    return [None if a is None else float(a in c) for c, a in zip(completions, answer)]

def length(completions, **kwargs):
    return [len(c.split()) / 10 for c in completions]

CALLS = {"n": 0}

def fails_on_second_call(completions, **kwargs):
    CALLS["n"] += 1
    if CALLS["n"] == 2:
        raise ValueError("the verifier crashed")
    return [0.0] * len(completions)

def wrong_length(completions, **kwargs):
    return [0.0]

def gives_nan(completions, **kwargs):
    return [float("nan")] + [0.0] * (len(completions) - 1)
'''


@pytest.fixture
def reward_file(tmp_path, monkeypatch):
    path = tmp_path / "rewards.py"
    path.write_text(textwrap.dedent(REWARDS_PY))
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.jsonl"))
    return path


@pytest.fixture
def records(tmp_path, ppo_inputs):
    """The tiny prompts as records with an answer column (None for the last two)."""
    from conftest import PROMPTS

    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "answer": (str(i % 3) if i < len(PROMPTS) - 2 else None), "id": i}
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["prompt"]: r for r in rows}


def ppo(ppo_inputs, out, *extra) -> list[str]:
    model, _, _ = ppo_inputs
    return [
        "ppo", "--model", str(model), "--steps", "2", "--batch-size", "4", "--minibatch-size", "2",
        "--response-tokens", "4", "--ppo-epochs", "1", "--device", "cpu", "--out", str(out),
        "--advantage-estimator", "grpo", "--samples-per-prompt", "2", *extra,
    ]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_scored_by_functions_alone_loads_no_reward_model(
    tmp_path, ppo_inputs, records, reward_file, monkeypatch, capsys
):
    from rlhf.models.reward_model import RewardModel

    def no_reward_model(*args, **kwargs):
        raise AssertionError("a reward model was loaded")

    monkeypatch.setattr(RewardModel, "from_pretrained", no_reward_model)
    prompts, by_prompt = records
    out = tmp_path / "run"
    argv = ppo(ppo_inputs, out, "--prompts", str(prompts), "--reward-fn", f"{reward_file}:answer_match",
               "--reward-fn", f"{reward_file}:length", "--reward-weights", "2,0.5")  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 2  # one call per step
    for call in seen:
        # Every row's answer is its own record's, each prompt twice (--samples-per-prompt 2).
        assert call["answer"] == [by_prompt[p]["answer"] for p in call["prompts"]]
        assert call["prompts"][0::2] == call["prompts"][1::2]
        assert all(isinstance(ids, list) for ids in call["ids"])
    assert (out / "reward_terms.png").is_file()  # each term's curve, drawn at the end
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert set(sample["terms"]) == {"answer_match", "length"}
    answer = by_prompt[sample["prompt"]]["answer"]
    expected = None if answer is None else float(answer in sample["response"])
    assert sample["terms"]["answer_match"] == expected
    for row in metrics(out):
        assert "reward/reward_model" not in row
        # Rows without an answer have no answer_match term, so the total's mean is not the
        # weighted sum of the term means here (the next test checks that sum).
        assert 0 <= row["reward/answer_match"] <= 1 and row["reward/length"] >= 0
        assert math.isfinite(row["objective/reward"])
        assert "reward/answer_match_std" in row and "reward/length_std" in row


def test_functions_and_a_reward_model_add_up(tmp_path, ppo_inputs, reward_file, capsys):
    """One term per function plus the reward model's, weighted: with every term scoring every row
    the mean of the total is the weighted sum of the terms' means."""
    _, rm, prompts = ppo_inputs
    out = tmp_path / "run"
    argv = ppo(ppo_inputs, out, "--prompts", str(prompts), "--reward-model", str(rm),
               "--reward-model-weight", "2", "--reward-fn", f"{reward_file}:length",
               "--reward-weights", "0.5")  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "reward_terms.png").is_file()
    for row in metrics(out):
        combined = 2 * row["reward/reward_model"] + 0.5 * row["reward/length"]
        assert row["objective/reward"] == pytest.approx(combined, abs=1e-5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fails_on_second_call", "reward fails_on_second_call ({file}:fails_on_second_call) raised ValueError: the verifier crashed"),
        ("wrong_length", "reward wrong_length: returned 1 values for 8 rows"),
        ("gives_nan", "reward gives_nan: row 0 (prompt"),
    ],
)  # fmt: skip
def test_a_failing_function_stops_the_run_before_any_update(
    tmp_path, ppo_inputs, reward_file, capsys, name, message
):
    _, _, prompts = ppo_inputs
    out = tmp_path / "run"
    argv = ppo(ppo_inputs, out, "--prompts", str(prompts), "--reward-fn", f"{reward_file}:{name}",
               "--save-every", "1")  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar
    assert err.count("rlhf ppo: error:") == 1 and message.format(file=reward_file) in last, err
    assert "Traceback" not in err
    assert not (out / "policy").exists()  # no final policy: the run stopped
    done = len(metrics(out))  # the steps before the failing one
    assert done == (1 if name == "fails_on_second_call" else 0)
    if done:
        assert (
            "the last good checkpoint is" in err and (out / "checkpoints" / "step-000001").is_dir()
        )


def test_the_math_verifier_compares_answers_as_mathematics():
    math_accuracy = load_reward_function("rlhf.reward.verifiers:math_accuracy")
    b = ScoreBatch(
        prompts=["q"] * 5,
        completions=["so it is $\\boxed{\\frac{1}{2}}$", "0.5", "the answer is 3", "7", "x"],
        ended=[True] * 5,
        columns={"solution": ["$\\frac{1}{2}$", "1/2", "4", None, "not math at all ]["]},
    )
    values = math_accuracy.score(b)
    assert values[:4] == [1.0, 1.0, 0.0, None]  # equal fractions match; no reference: None
    assert values[4] in (None, 0.0)  # an unparsable reference is skipped or fails, never passes
    with pytest.raises(ConfigError, match="'solution' or 'answer' field"):
        math_accuracy.fn(completions=["1"])


def test_the_math_verifier_without_its_package_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now fails
    with pytest.raises(
        ConfigError, match=r"needs the math-verify package: pip install 'rlhf\[math\]'"
    ):
        load_reward_function("rlhf.reward.verifiers:math_accuracy")
