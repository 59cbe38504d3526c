"""Seconds per step of each advantage estimator on the same PPO loop, at the same budget.

Shapes: B sequences per step, R response tokens.

Run from the repository root:

    python benchmarks/bench_algos.py [--rounds 12] [--grid 64x24,64x48] [--json out.json]

Every method gets its own trainer over copies of the same random-init GPT-2 (4 layers x 128, the
project's 1,024-token tokenizer: the built-in task's shape), the same reward model and B sequences
per step (the group methods as B / 4 prompts x 4 samples), 4 epochs over 1 minibatch, fp32, 2
threads. The methods take turns step by step, so they run under the same machine load, and the
median of the timed rounds (after 2 warm-up rounds) is reported with its phases: rollout passes
(generation, forward passes, scoring) and the update. The ratio is against PPO with its value head
on the policy's trunk (gae); gae_value_model is PPO with a separate value network
(--value-model reward), as TRL's PPOTrainer and OpenRLHF train their critic. A random-init model puts about 1/1024 of its mass on EOS, so every response runs to R
tokens and every method processes the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from rlhf.models.reward_model import RewardModel  # noqa: E402
from rlhf.rl.config import PPOConfig  # noqa: E402
from rlhf.rl.trainer import PPOTrainer  # noqa: E402
from rlhf.task import corpus  # noqa: E402

# gae_value_model: PPO with a separate value network (--value-model reward), the critic that TRL's
# PPOTrainer and OpenRLHF train; gae alone has the value head on the policy's trunk.
METHODS = ("gae", "gae_value_model", "rloo", "grpo", "dr_grpo", "reinforce_pp")
GROUP = ("rloo", "grpo", "dr_grpo")
PHASES = ("time/generate_s", "time/forward_s", "time/score_s", "time/update_s")


def build(seed: int = 0):
    """bench_ppo's tokenizer and random-init GPT-2, as one model to copy."""
    from bench_ppo import build_base, fresh_lm

    tok, config, state = build_base(seed)
    return tok, fresh_lm(config, state)


def trainer_for(method: str, tok, lm, sequences: int, response: int) -> PPOTrainer:
    k = 4 if method in GROUP else 1
    separate = method == "gae_value_model"
    cfg = PPOConfig(
        steps=10**6, batch_size=sequences // k, samples_per_prompt=k, minibatch_size=sequences,
        ppo_epochs=4, response_tokens=response, lr=1e-5, kl_coef=0.05, dtype="float32",
        advantage_estimator="gae" if separate else method,
        value_model="reward" if separate else "shared",
    )  # fmt: skip
    reward = RewardModel(copy.deepcopy(lm), tokenizer=tok)
    return PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), reward, tok, cfg)


def run_point(tok, lm, sequences: int, response: int, rounds: int) -> dict:
    prompts = corpus.prompts(sequences, seed=3, split="train")
    trainers = {m: trainer_for(m, tok, lm, sequences, response) for m in METHODS}
    samples: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    for r in range(rounds + 2):
        for method, trainer in trainers.items():
            k = trainer.config.samples_per_prompt
            metrics = trainer.step(prompts[: sequences // k])
            assert trainer.last_rollout.R == response, "every response must run to R tokens"
            if r >= 2:
                for key in ("time/step_s", *PHASES):
                    samples[method].setdefault(key, []).append(metrics[key])
    return {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed steps of each method")
    parser.add_argument("--grid", default="64x24,64x48", help="sequences x response tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, lm = build()
    results = {}
    for point in args.grid.split(","):
        sequences, response = (int(x) for x in point.split("x"))
        res = run_point(tok, lm, sequences, response, args.rounds)
        results[point] = res
        base = res["gae"]["time/step_s"]
        print(f"\nB={sequences} sequences, R={response} tokens, median of {args.rounds} steps")
        print("| method | s per step | / PPO (gae) | generate | forward | score | update |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m, r in res.items():
            phases = " | ".join(f"{r[p]:.3f}" for p in PHASES)
            print(f"| {m} | {r['time/step_s']:.3f} | {r['time/step_s'] / base:.2f}x | {phases} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
