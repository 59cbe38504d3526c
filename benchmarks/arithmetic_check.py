"""Does RL raise the arithmetic task's accuracy, and does a lenient verifier get gamed?

Trains the arithmetic base model (`rlhf.task.arithmetic_model`) with the project's `PPOTrainer`
(critic-free GRPO by default) against the strict verifier and against the lenient one, each with
and without a KL penalty, and prints held-out strict and lenient accuracy before and after, and
the training-batch lenient and strict rewards over the steps.

The rollouts are scored by the task's TRL-style reward functions through the trainer's reward
terms (`reward.sources.RewardFunction`, no reward model), with each prompt record's `answer`
passed as a column. The task's `ArithmeticJudge` is the gold judge, so `objective/gold` is the
strict accuracy of each training batch whichever verifier is the reward.

    python benchmarks/arithmetic_check.py                       # 4 runs, 150 steps each
    python benchmarks/arithmetic_check.py --runs strict:0 lenient:0 --steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.reward.sources import RewardFunction, RewardTerm
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer
from rlhf.task import arithmetic
from rlhf.task.arithmetic_model import arithmetic_model_dir, arithmetic_model_info, evaluate

REWARDS = {"strict": arithmetic.strict_reward, "lenient": arithmetic.lenient_reward}


def run(name: str, kl_coef: float, args, model_dir) -> dict:
    tokenizer = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir)
    reference = copy.deepcopy(policy)
    before = evaluate(policy, tokenizer, args.eval_prompts, seed=args.seed)
    cfg = PPOConfig(
        steps=args.steps, batch_size=args.batch_size, minibatch_size=args.batch_size * args.samples,
        ppo_epochs=args.ppo_epochs, response_tokens=args.response_tokens, lr=args.lr,
        kl_coef=kl_coef, advantage_estimator=args.estimator, samples_per_prompt=args.samples,
        seed=args.seed,
    )  # fmt: skip
    trainer = PPOTrainer(
        policy, reference, None, tokenizer, cfg, gold_judge=arithmetic.ArithmeticJudge(),
        reward_terms=[RewardTerm(RewardFunction(REWARDS[name]))],
    )  # fmt: skip
    records = arithmetic.arithmetic_prompts(args.steps * args.batch_size, seed=args.seed)
    history, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = records[step * args.batch_size : (step + 1) * args.batch_size]
        m = trainer.step([r["prompt"] for r in batch], {"answer": [r["answer"] for r in batch]})
        texts = trainer.last_rollout.texts
        answers = [arithmetic.solve(p) for p in trainer.last_rollout.prompts]
        history.append({
            "step": step,
            "reward": m["objective/reward"],
            "strict": m["objective/gold"],
            "lenient": arithmetic.lenient_accuracy(texts, answers),
            "kl": m["objective/kl"],
            "numbers": sum(len(arithmetic.numbers_in(t)) for t in texts) / len(texts),
        })  # fmt: skip
    after = evaluate(trainer.policy.lm, tokenizer, args.eval_prompts, seed=args.seed)
    return {
        "reward": name, "kl_coef": kl_coef, "before": before, "after": after,
        "history": history, "seconds": round(time.perf_counter() - start, 1),
        "sample": trainer.last_rollout.texts[:6],
    }  # fmt: skip


def _mean(rows, key, lo, hi):
    part = rows[lo:hi]
    return sum(r[key] for r in part) / max(1, len(part))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["strict:0.1", "strict:0", "lenient:0.1", "lenient:0"],
                        help="reward:kl_coef pairs")  # fmt: skip
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--estimator", default="grpo")
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write every run's numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = arithmetic_model_dir()
    info = arithmetic_model_info(model_dir)
    print(f"base model {model_dir.name}: held-out strict {info['heldout_strict_accuracy']:.3f} at "
          f"temperature 1, {info['heldout_strict_accuracy_greedy']:.3f} greedy; pretrained in "
          f"{info['train_seconds']} s")  # fmt: skip
    results = []
    for spec in args.runs:
        name, kl = spec.split(":")
        r = run(name, float(kl), args, model_dir)
        results.append(r)
        h, n = r["history"], len(r["history"])
        print(
            f"{args.estimator} reward={name:7s} kl_coef={float(kl):<4} ({r['seconds']} s) held-out "
            f"strict {r['before']['strict']:.3f} -> {r['after']['strict']:.3f}, lenient "
            f"{r['before']['lenient']:.3f} -> {r['after']['lenient']:.3f}, numbers/answer "
            f"{r['before']['numbers_per_answer']:.2f} -> {r['after']['numbers_per_answer']:.2f} | "
            f"train batches, first 5 -> last 5 steps: lenient {_mean(h, 'lenient', 0, 5):.2f} -> "
            f"{_mean(h, 'lenient', n - 5, n):.2f}, strict {_mean(h, 'strict', 0, 5):.2f} -> "
            f"{_mean(h, 'strict', n - 5, n):.2f}, KL {_mean(h, 'kl', n - 5, n):.2f}"
        )
        print(f"    samples: {r['sample']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": info, "args": vars(args), "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
