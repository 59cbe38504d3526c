"""The extra cost per PPO step of a reward-model ensemble of N members against one reward model.

Run from the repository root:

    python benchmarks/bench_ensemble.py [--rounds 10] [--members 4] [--grid 64x24,64x48] [--json out.json]

Two trainers over copies of the same random-init GPT-2 of the built-in task's shape (4 layers x
128, the 1,024-token tokenizer), 64 sequences per step, PPO (GAE) with 4 epochs over one minibatch,
fp32, 2 threads. One scores with a reward model (a full copy of the base with a scalar head), the
other with an ensemble of N LoRA members (rank 8) on one shared base, what `rlhf train-reward
--ensemble N` trains. The trainers take turns step by step, so both run under the same load; the
median of the timed steps (after 2 warm-up rounds) is reported with the scoring phase alone, and
the resident memory that the ensemble's members add is counted in parameters.
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

from rlhf.models.lora_args import LoraArgs  # noqa: E402
from rlhf.models.reward_ensemble import RewardEnsemble  # noqa: E402
from rlhf.models.reward_model import RewardModel  # noqa: E402
from rlhf.rl.config import PPOConfig  # noqa: E402
from rlhf.rl.trainer import PPOTrainer  # noqa: E402
from rlhf.task import corpus  # noqa: E402


def trainers(members: int, sequences: int, response: int) -> dict[str, PPOTrainer]:
    from bench_ppo import build_base, fresh_lm

    tok, config, state = build_base(0)
    lm = fresh_lm(config, state)
    cfg = PPOConfig(
        steps=10**6, batch_size=sequences, minibatch_size=sequences, ppo_epochs=4,
        response_tokens=response, lr=1e-5, kl_coef=0.05, dtype="float32",
    )  # fmt: skip
    single = RewardModel(copy.deepcopy(lm), tokenizer=tok)
    ensemble = RewardEnsemble.from_base(
        copy.deepcopy(lm), LoraArgs(lora_r=8), members, seed=0, tokenizer=tok
    )
    return {
        "one reward model": PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), single, tok, cfg),
        f"ensemble of {members}": PPOTrainer(
            copy.deepcopy(lm), copy.deepcopy(lm), ensemble, tok, copy.deepcopy(cfg)
        ),
    }


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_point(members: int, sequences: int, response: int, rounds: int) -> dict:
    runs = trainers(members, sequences, response)
    prompts = corpus.prompts(sequences, seed=3, split="train")
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    for r in range(rounds + 2):
        for name, trainer in runs.items():
            metrics = trainer.step(prompts)
            if r >= 2:
                for key in ("time/step_s", "time/score_s"):
                    samples[name].setdefault(key, []).append(metrics[key])
    out = {}
    for name, trainer in runs.items():
        out[name] = {k.split("/")[1]: statistics.median(v) for k, v in samples[name].items()}
        out[name]["reward_parameters"] = parameters(trainer.reward_model)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--grid", default="64x24,64x48", help="SEQUENCESxRESPONSE_TOKENS,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    results = {}
    for point in args.grid.split(","):
        sequences, response = (int(x) for x in point.split("x"))
        r = run_point(args.members, sequences, response, args.rounds)
        results[point] = r
        one, ens = r["one reward model"], r[f"ensemble of {args.members}"]
        print(
            f"{point}: step {one['step_s']:.3f} s -> {ens['step_s']:.3f} s "
            f"({ens['step_s'] / one['step_s']:.2f}x); scoring {one['score_s']:.3f} s -> "
            f"{ens['score_s']:.3f} s; reward parameters {one['reward_parameters']:,} -> "
            f"{ens['reward_parameters']:,}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"members": args.members, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
