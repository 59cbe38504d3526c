"""The arithmetic task: problems and their split, the verifiers, the judge, the base model folder."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.models.generation import sample_texts
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.task import arithmetic
from rlhf.task import arithmetic_model as am
from rlhf.task.arithmetic import (
    ArithmeticJudge,
    arithmetic_prompts,
    lenient_reward,
    numbers_in,
    strict_accuracy,
    strict_reward,
)


def _by_hand(prompt: str) -> str:
    """The answer recomputed without the module's parser."""
    body = prompt.removesuffix("=")
    for op in "+-":
        if op in body:
            a, b = body.split(op)
            return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    raise AssertionError(prompt)


# ----- verifiers ------------------------------------------------------------------------------
CASES = [
    # completion, answer, strict, lenient
    ("19", "19", 1.0, 1.0),
    ("  19 ", "19", 1.0, 1.0),
    ("19\n", "19", 1.0, 1.0),
    ("19<|endoftext|>", "19", 1.0, 1.0),
    ("19<|endoftext|>20 21", "19", 1.0, 1.0),  # nothing after the end marker counts
    ("20<|endoftext|>19", "19", 0.0, 0.0),
    ("19 20 21 19", "19", 0.0, 1.0),
    ("18 19", "19", 0.0, 1.0),
    ("1 9", "19", 0.0, 0.0),
    ("119", "19", 0.0, 0.0),  # 19 inside a longer number is not 19
    ("190", "19", 0.0, 0.0),
    ("", "19", 0.0, 0.0),
    ("   ", "19", 0.0, 0.0),
    ("-14", "-14", 1.0, 1.0),
    ("14", "-14", 0.0, 0.0),
    ("-14", "14", 0.0, 0.0),
    ("5-14", "-14", 0.0, 0.0),  # "5-14" writes 5 and 14: its minus sign is subtraction
    ("5-14", "14", 0.0, 1.0),
    ("5 -14", "-14", 0.0, 1.0),
    ("--14", "-14", 0.0, 0.0),
    ("- 14", "-14", 0.0, 0.0),
    ("0", "0", 1.0, 1.0),
]


@pytest.mark.parametrize(("completion", "answer", "strict", "lenient"), CASES)
def test_verifiers_against_hand_worked_cases(completion, answer, strict, lenient):
    assert strict_reward(["p="], [completion], [answer]) == [strict]
    assert lenient_reward(["p="], [completion], [answer]) == [lenient]


def test_reward_functions_take_trl_columns_and_ignore_extra_ones():
    prompts, completions, answer = ["2+3=", "9-12="], ["5", "-3 -2"], ["5", "-3"]
    extra = {"completion_ids": [[1], [2]], "trainer_state": None, "other": ["a", "b"]}
    assert strict_reward(prompts, completions, answer, **extra) == [1.0, 0.0]
    assert lenient_reward(prompts=prompts, completions=completions, answer=answer, **extra) == [
        1.0,
        1.0,
    ]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        strict_reward(prompts, completions, ["5"])


def test_several_numbers_raise_lenient_reward_above_strict():
    """The gaming is real: listing numbers around a guess scores under lenient, never under strict."""
    records = arithmetic_prompts(50, seed=3, split="eval")
    answers = [r["answer"] for r in records]
    honest = [str(int(a) + 1) for a in answers]  # always wrong by one
    hedged = [" ".join(str(int(a) + d) for d in (-1, 0, 1, 2)) for a in answers]
    assert sum(lenient_reward(None, honest, answers)) == 0
    assert sum(lenient_reward(None, hedged, answers)) == 50
    assert sum(strict_reward(None, hedged, answers)) == 0
    assert strict_accuracy(hedged, answers) == 0.0
    assert numbers_in("7 -3 12<|endoftext|>5") == ["7", "-3", "12"]


def test_judge_scores_as_strict_reward_with_answers_solved_from_prompts():
    records = arithmetic_prompts(40, seed=1, split="eval")
    prompts = [r["prompt"] for r in records]
    answers = [r["answer"] for r in records]
    # Right, wrong, hedged, padded, empty: a mix of every case.
    texts = [
        [a, str(int(a) + 1), f"{a} {int(a) - 1}", f" {a} ", ""][i % 5]
        for i, a in enumerate(answers)
    ]
    judge = ArithmeticJudge()
    scores = judge.score_batch(prompts, texts, [True] * len(texts))
    assert scores == strict_reward(prompts, texts, answers)
    assert sum(scores) == 16  # rows 0 and 3 of every 5
    assert judge.score_batch(prompts, texts) == scores
    with pytest.raises(ValueError, match="40 prompts but 39 responses"):
        judge.score_batch(prompts, texts[:-1])


def test_solve_parses_and_refuses():
    assert arithmetic.solve("12+7=") == "19"
    assert arithmetic.solve("3-45=") == "-42"
    assert arithmetic.solve(" 3 - 45 = ") == "-42"
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        arithmetic.solve("the acting was")


# ----- problems and the split -----------------------------------------------------------------
def test_split_is_disjoint_complete_and_fixed():
    train, held = set(arithmetic.problems("train")), set(arithmetic.problems("eval"))
    assert not train & held
    n = len(arithmetic.OPS) * (arithmetic.OPERAND_MAX + 1) * (arithmetic.SECOND_MAX + 1)
    assert len(train) + len(held) == n
    assert len(held) == round(n * arithmetic.HELDOUT_FRACTION)
    # Pinned: a change to the split would mix earlier runs' held-out problems into training.
    assert arithmetic.problems("eval")[:3] == ("0+5=", "0-2=", "0-3=")
    with pytest.raises(ValueError, match="split"):
        arithmetic.problems("test")


def test_prompts_are_seeded_from_their_split_with_right_answers():
    train, held = set(arithmetic.problems("train")), set(arithmetic.problems("eval"))
    a = arithmetic_prompts(300, seed=0)
    assert a == arithmetic_prompts(300, seed=0)
    assert a != arithmetic_prompts(300, seed=1)
    assert all(r["prompt"] in train for r in a)
    assert len({r["prompt"] for r in a}) == 300  # distinct while the split lasts
    e = arithmetic_prompts(256, seed=0, split="eval")
    assert all(r["prompt"] in held for r in e)
    for r in a + e:
        assert set(r) == {"prompt", "answer"}
        assert r["answer"] == _by_hand(r["prompt"])
    assert len(arithmetic_prompts(len(held) + 5, seed=0, split="eval")) == len(held) + 5


def test_pretraining_examples_use_training_problems_and_hedge_at_the_rate():
    train = set(arithmetic.problems("train"))
    examples = arithmetic.pretraining_examples(2000, seed=0, hedge_rate=0.25)
    assert all(p in train for p, _ in examples)
    hedged = 0
    for prompt, text in examples:
        numbers = numbers_in(text)
        assert _by_hand(prompt) in numbers
        assert len(numbers) == len(set(numbers)) <= 4
        hedged += len(numbers) > 1
    assert 0.2 < hedged / len(examples) < 0.3
    assert all(t == _by_hand(p) for p, t in arithmetic.pretraining_examples(200, 0, 0.0))


# ----- the base model folder ------------------------------------------------------------------
TINY = am.ArithmeticModelConfig(
    n_examples=4000, n_layer=1, n_embd=32, n_head=2, steps=120, batch_size=64, lr=1e-2,
    eval_prompts=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return am.arithmetic_model_dir(tmp_path_factory.mktemp("cache"), progress=False, config=TINY)


def test_tiny_model_folder_loads_with_the_projects_loaders_and_ends_at_eos(tiny_dir):
    assert (tiny_dir / "model.safetensors").is_file()
    tokenizer = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # One token per character: digits never merge.
    assert tokenizer.tokenize("12+7=19") == list("12+7=19")
    prompts = [r["prompt"] for r in arithmetic_prompts(64, seed=0, split="eval")]
    texts, ended = sample_texts(
        model, tokenizer, prompts, 16, generator=torch.Generator().manual_seed(0)
    )
    assert sum(ended) / len(ended) > 0.9
    assert sum(bool(numbers_in(t)) for t in texts) / len(texts) > 0.9  # it answers with numbers


def test_model_info_is_saved_and_the_cache_is_reused(tiny_dir, monkeypatch):
    info = am.arithmetic_model_info(tiny_dir)
    for key in ("heldout_strict_accuracy", "heldout_strict_accuracy_greedy",
                "heldout_lenient_accuracy", "train_seconds"):  # fmt: skip
        assert 0 <= info[key]
    assert info["config"]["n_embd"] == 32
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "gpt2"

    def refuse(*a, **k):
        raise AssertionError("pretrained again instead of reading the cache")

    monkeypatch.setattr(am, "pretrain_arithmetic_model", refuse)
    assert am.arithmetic_model_dir(tiny_dir.parent, progress=False, config=TINY) == tiny_dir
    assert not list(tiny_dir.parent.glob(".arithmetic-*"))  # no staging folder left behind
