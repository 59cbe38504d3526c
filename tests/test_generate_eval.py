"""`rlhf generate` and `rlhf eval`: the folders they read, reproducible paired sampling, and
numbers checked against slow references computed here."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import PROMPTS, make_tiny_lm
from rlhf.analysis.evaluate import wilson_interval, win_rate
from rlhf.analysis.generate import (
    PolicySource,
    read_prompt_texts,
    resolve_policy,
    row_draws,
    sample,
)
from rlhf.analysis.sampling_config import EvalConfig, GenerateConfig
from rlhf.cli import build_parser, main
from rlhf.core import logprobs_from_logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """A real 3-step LoRA PPO run of the tiny GPT-2 (policy/ is an adapter, policy-merged/ the
    adapter folded in), its reward model and its prompt file."""
    from rlhf.models.reward_model import RewardModel

    root = tmp_path_factory.mktemp("lora-run")
    rm = RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer)
    rm.reward_gain.fill_(2.0)  # a normalisation that is not the identity, as training fits one
    rm.reward_bias.fill_(0.5)
    rm.save_pretrained(root / "rm")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = [
        "ppo", "--model", str(tiny_model_dir), "--reward-model", str(root / "rm"),
        "--prompts", str(root / "prompts.txt"), "--out", str(root / "run"), "--steps", "3",
        "--batch-size", "4", "--minibatch-size", "2", "--response-tokens", "6", "--lr", "3e-2",
        "--lora-r", "4", "--merge-lora", "--save-every", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    return root


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gen(policy, out, *extra) -> list[dict]:
    assert main(["generate", str(policy), "--out", str(out), "--response-tokens", "6", *extra]) == 0
    return _rows(out)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"rlhf {command}: error: ") and err.count("\n") == 1, err
    return err


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71681,
    # half 1.95996 * sqrt(0.016 + 0.0096036) / 1.38415 = 0.22657.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10 keeps a width: (0, z^2 / (n + z^2)) = (0, 3.8415 / 13.8415).
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-4)
    # Ties count half: [1, 2, 3, 3] against [0, 3, 3, 1] is a win, a loss, a tie and a win.
    w = win_rate([1, 2, 3, 3], [0, 3, 3, 1])
    assert (w["wins"], w["ties"], w["losses"], w["rate"]) == (2, 1, 1, 0.625)
    assert (w["low"], w["high"]) == wilson_interval(2.5, 4)


def test_generate_from_a_model_folder_matches_one_row_at_a_time(tmp_path, tiny_model_dir, capsys):
    """Prompts on the command line, several samples each; every row equals a batch of one
    sampled from that row's draws (the slow reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.generation import decode_responses, encode_prompts, sample_responses

    rows = _gen(
        tiny_model_dir, tmp_path / "g.jsonl", "--prompt", "the plot", "--prompt", "this phone",
        "--num-samples", "3",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert [r["prompt"] for r in rows] == ["the plot"] * 3 + ["this phone"] * 3
    assert [r["sample"] for r in rows] == [0, 1, 2] * 2
    assert "> the plot" in out and str(tmp_path / "g.jsonl") in out and "--baseline" in out
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    draws = row_draws(6, 6, seed=0)
    for i, row in enumerate(rows):
        ids, mask, _ = encode_prompts(tokenizer, [row["prompt"]])
        response = sample_responses(
            lm,
            ids,
            mask,
            6,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            uniforms=draws[i : i + 1],
        )
        texts, ended = decode_responses(tokenizer, response, tokenizer.eos_token_id)
        assert (row["response"], row["ended"]) == (texts[0], ended[0])
    assert len({r["response"] for r in rows}) > 1  # the samples of one prompt differ


def test_same_seed_same_output_whatever_the_batch_size(tmp_path, tiny_model_dir, ppo_inputs):
    _, _, prompts = ppo_inputs
    a = _gen(tiny_model_dir, tmp_path / "a.jsonl", "--prompts", str(prompts), "--batch-size", "64")
    b = _gen(tiny_model_dir, tmp_path / "b.jsonl", "--prompts", str(prompts), "--batch-size", "3")
    c = _gen(tiny_model_dir, tmp_path / "c.jsonl", "--prompts", str(prompts), "--seed", "1")
    assert a == b
    assert [r["prompt"] for r in a] == PROMPTS  # the whole file, in order
    assert [r["response"] for r in a] != [r["response"] for r in c]
    assert len(_gen(tiny_model_dir, tmp_path / "d.jsonl", "--prompts", str(prompts),
                    "--num-prompts", "3")) == 3  # fmt: skip


def test_top_k_one_is_greedy(tmp_path, tiny_model_dir):
    a = _gen(tiny_model_dir, tmp_path / "a.jsonl", "--prompt", "the plot", "--top-k", "1",
             "--num-samples", "3")  # fmt: skip
    assert len({r["response"] for r in a}) == 1


def test_generate_from_a_run_an_adapter_and_the_merged_model(tmp_path, lora_run, tiny_model_dir):
    run = lora_run / "run"
    assert main(["generate", str(run), "--prompts", str(lora_run / "prompts.txt")]) == 0
    from_run = _rows(run / "generations.jsonl")  # the run folder's default output
    assert len(from_run) == len(PROMPTS)
    assert max(r["response_tokens"] for r in from_run) <= 6  # the run's --response-tokens
    args = ("--prompts", str(lora_run / "prompts.txt"))
    adapter = _gen(run / "policy", tmp_path / "adapter.jsonl", *args)
    merged = _gen(run / "policy-merged", tmp_path / "merged.jsonl", *args)
    base = _gen(tiny_model_dir, tmp_path / "base.jsonl", *args)
    assert from_run == adapter == merged
    assert [r["response"] for r in adapter] != [r["response"] for r in base]  # it was trained

    # A moved adapter whose base is gone says so in one line, and --base-model puts it right.
    moved = tmp_path / "moved-adapter"
    shutil.copytree(run / "policy", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", str(moved), *args, "--out", str(tmp_path / "x.jsonl")]) == 2
    again = _gen(moved, tmp_path / "moved.jsonl", *args, "--base-model", str(tiny_model_dir))
    assert again == adapter


def test_generate_refuses_bad_input_in_one_line(tmp_path, tiny_model_dir, lora_run, capsys):
    cases = [
        (["generate", str(tmp_path / "missing")], "no such folder"),
        (["generate", str(tiny_model_dir)], "--prompts FILE"),  # not the built-in task
        (["generate", str(tiny_model_dir), "--prompt", "a", "--top-p", "0"], "--top-p"),
        (["generate", str(tiny_model_dir), "--prompt", "a", "--temperature", "0"], "--temperature"),
        (["generate", str(tiny_model_dir), "--prompt", "a", "--num-samples", "0"], "--num-samples"),
        (["generate"], "give the policy"),
        (["generate", str(lora_run / "rm")], "reward"),
        (["generate", str(lora_run / "prompts.txt")], "got a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_line_error(capsys, "generate"), argv
    # A reward model's run folder is named as one.
    rm_run = tmp_path / "rm-run"
    (rm_run / "reward_model").mkdir(parents=True)
    (rm_run / "config.json").write_text(json.dumps({"_environment": {}, "model": None}))
    assert main(["generate", str(rm_run)]) == 2
    assert "--reward-model" in _one_line_error(capsys, "generate")


def _slow_kl(policy, ref, prompt_ids: list[int], response: list[int]) -> float:
    """k1 summed over the response, one token at a time from the whole prefix."""
    total = 0.0
    for t, token in enumerate(response):
        prefix = torch.tensor([prompt_ids + response[:t]])
        with torch.no_grad():
            lp, lr = (logprobs_from_logits(m(input_ids=prefix).logits[:, -1:], torch.tensor([[token]]))
                      for m in (policy, ref))  # fmt: skip
        total += (lp - lr).item()
    return total


def _check_rows(rows: list[dict], policy, ref_dir, rm_dir, response_tokens: int) -> None:
    """Each row's KL and reward, recomputed one token at a time on the row's sampled tokens: a
    batch of one from the row's draws (the generate test checks that this is what the batched
    run sampled), whose text must be the row's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.reward_model import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    rm = RewardModel.from_pretrained(rm_dir).eval()
    draws = row_draws(len(rows), response_tokens, seed=0)
    for i, row in enumerate(rows):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        one = sample(policy, tokenizer, [row["prompt"]], draws[i : i + 1], progress=False)
        assert (one.texts[0], one.ended[0]) == (row["policy"], row["policy_ended"])
        response = one.responses[0]
        assert len(response) == row["policy_tokens"]
        assert row["policy_kl"] == pytest.approx(
            _slow_kl(policy, ref, prompt_ids, response), abs=1e-4
        )
        eos = [] if row["policy_ended"] else [tokenizer.eos_token_id]  # scored at an EOS
        ids = torch.tensor([prompt_ids + response + eos])
        with torch.no_grad():
            reward = rm(ids, torch.ones_like(ids)).item()
        assert row["policy_reward"] == pytest.approx(reward, abs=1e-4)


def test_eval_of_a_run_against_its_reference(tmp_path, lora_run, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = lora_run / "run"
    prompts = lora_run / "prompts.txt"
    assert main(["eval", str(run), "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert (run / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "win rate under the reward model" in out and "baseline (reference)" in out
    rows = result["per_prompt"]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert result["models"]["reward_model"] == str(lora_run / "rm")  # the run's, by default
    assert result["config"]["response_tokens"] == 6  # the run's, by default

    # The win rate and its interval, recomputed from the per-prompt rewards.
    wins = sum(r["policy_reward"] > r["baseline_reward"] for r in rows)
    ties = sum(r["policy_reward"] == r["baseline_reward"] for r in rows)
    n = len(rows)
    p, z = (wins + ties / 2) / n, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    w = result["win_rate"]
    assert w["rate"] == pytest.approx(p) and w["wins"] == wins and w["ties"] == ties
    assert (w["low"], w["high"]) == (pytest.approx(centre - half), pytest.approx(centre + half))
    for key in ("reward", "kl", "gold"):
        if key != "gold":
            mean = sum(r[f"policy_{key}"] for r in rows) / n
            assert result["policy"][key] == pytest.approx(mean)
    assert result["policy"]["gold"] is None  # not the built-in task
    assert all(r["baseline_kl"] == 0 for r in rows)  # the baseline is the reference
    base_rows = _gen(tiny_model_dir, tmp_path / "base.jsonl", "--prompts", str(prompts))
    assert [r["baseline"] for r in rows] == [r["response"] for r in base_rows]  # the same draws

    # Every row's KL and reward against slow references.
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "policy"
    )
    _check_rows(rows, policy.eval(), tiny_model_dir, lora_run / "rm", 6)
    assert any(r["policy_kl"] != 0 for r in rows)

    # A second evaluation into the same folder says it replaced the first.
    assert main(["eval", str(run), "--prompts", str(prompts), "--seed", "1"]) == 0
    assert "replaced the earlier evaluation" in capsys.readouterr().out


def test_kl_and_reward_when_responses_end_early(tmp_path, tiny_tokenizer, tiny_model_dir, lora_run):
    """A policy that leans to EOS ends rows at different lengths: the padding after each EOS
    must count for nothing in the KL, and the reward is read at the EOS."""
    from transformers import AutoModelForCausalLM

    lm = make_tiny_lm(tiny_tokenizer, seed=5)
    with torch.no_grad():  # layer norm's output sums to 0, so the EOS logit is 0.13 * 32
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.transformer.wte.weight[tiny_tokenizer.eos_token_id] = 0.13
    lm.save_pretrained(tmp_path / "eos")
    tiny_tokenizer.save_pretrained(tmp_path / "eos")
    argv = [
        "eval", str(tmp_path / "eos"), "--ref-model", str(tiny_model_dir), "--baseline",
        str(tiny_model_dir), "--reward-model", str(lora_run / "rm"), "--prompts",
        str(lora_run / "prompts.txt"), "--response-tokens", "8", "--out", str(tmp_path / "ev"),
    ]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["per_prompt"]
    lengths = {r["policy_tokens"] for r in rows}
    assert len(lengths) > 2 and any(r["policy_ended"] for r in rows)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "eos").eval()
    _check_rows(rows, policy, tiny_model_dir, lora_run / "rm", 8)


def test_a_policy_against_itself_ties_everywhere(tmp_path, ppo_inputs):
    model_dir, rm_dir, prompts = ppo_inputs
    argv = [
        "eval", str(model_dir), "--baseline", str(model_dir), "--ref-model", str(model_dir),
        "--reward-model", str(rm_dir), "--prompts", str(prompts), "--response-tokens", "8",
        "--out", str(tmp_path / "ev"),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    w = result["win_rate"]
    assert (w["rate"], w["ties"], w["n"]) == (0.5, len(PROMPTS), len(PROMPTS))
    # 4 of 8: centre 0.5, half 1.95996 * sqrt(0.03125 + 0.015006) / 1.48018 = 0.28478.
    assert w["low"] == pytest.approx(0.2152, abs=1e-4) and w["high"] == pytest.approx(0.7848, abs=1e-4)  # fmt: skip
    assert result["policy"]["kl"] == 0 and result["baseline"]["kl"] == 0
    assert all(r["policy"] == r["baseline"] for r in result["per_prompt"])


def test_eval_without_a_reward_model_reports_the_rest(tmp_path, ppo_inputs, capsys):
    model_dir, _, prompts = ppo_inputs
    argv = ["eval", str(model_dir), "--baseline", str(model_dir), "--prompts", str(prompts),
            "--out", str(tmp_path / "ev")]  # fmt: skip
    assert main(argv) == 0
    assert "no reward model, so no win rate" in capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["win_rate"] is None and result["policy"]["reward"] is None
    assert result["policy"]["kl"] is None  # no reference named
    assert result["policy"]["response_tokens"] > 0 and 0 <= result["policy"]["distinct_2"] <= 1


def test_eval_refuses_bad_input_in_one_line(tmp_path, ppo_inputs, capsys):
    model_dir, rm_dir, prompts = ppo_inputs
    against_itself = ["eval", str(model_dir), "--baseline", str(model_dir)]
    cases = [
        (["eval", str(tmp_path / "missing")], "no such folder"),
        (["eval", str(model_dir), "--prompts", str(prompts)], "--baseline"),
        ([*against_itself, "--prompts", str(tmp_path / "x.txt")], "x.txt"),
        (
            [*against_itself, "--prompts", str(prompts), "--reward-model", str(model_dir)],
            "not a reward model",
        ),
        (["eval", str(model_dir), "--num-prompts", "0"], "--num-prompts"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _one_line_error(capsys, "eval"), argv


def test_the_built_in_task_is_recognised_and_gives_held_out_prompts(tmp_path):
    from rlhf.task import corpus

    source = PolicySource(tmp_path, tmp_path, run_config={"model": None}, kind="ppo")
    assert source.builtin
    demo_run = PolicySource(tmp_path, tmp_path, run_config={"model": "/c/base", "prompts": None}, kind="ppo")  # fmt: skip
    assert demo_run.builtin  # rlhf demo names the cached base model, with the built-in prompts
    own = PolicySource(
        tmp_path, tmp_path, run_config={"model": "m", "prompts": "p.txt"}, kind="ppo"
    )
    assert not own.builtin and not PolicySource(tmp_path, tmp_path).builtin
    cfg = EvalConfig(policy="x", num_prompts=20)
    prompts, _ = read_prompt_texts(cfg, source, [], 256, draw=True)
    assert prompts == corpus.prompts(20, seed=0, split="eval")
    prompts, _ = read_prompt_texts(GenerateConfig(policy="x"), source, [], 8, draw=False)
    assert len(set(prompts)) == 8 and set(prompts) <= set(corpus.split_openings("eval"))


def test_a_run_folder_is_read_through_its_policy(lora_run):
    source = resolve_policy(lora_run / "run")
    assert source.kind == "ppo" and source.model_dir == lora_run / "run" / "policy"
    assert source.base_dir is not None  # an adapter, on the model the run started from
    inner = resolve_policy(lora_run / "run" / "policy-merged")
    assert inner.run_dir == lora_run / "run" and inner.base_dir is None


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_help_explains_and_ends_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert f"rlhf {command}" in out.split("examples:", 1)[1]
    assert "--temperature" in out and "--seed" in out
