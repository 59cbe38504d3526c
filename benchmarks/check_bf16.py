"""GPU check of issue 18: in bf16, a reference that copies the policy gives KL 0 at step 0, and
every parameter the optimizer trains (the separate critic's too) is float32.

    python benchmarks/check_bf16.py [--device cuda] [--value-model reward]

Runs on the built-in task (trained and cached on first use); prints one line per check and exits
1 if one fails. The goal: |KL| <= 1e-4 nats per sequence at step 0, on the CPU and on CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--value-model", default="reward", choices=["shared", "reward"])
    args = parser.parse_args()

    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.inputs import load_run_inputs
    from rlhf.rl.trainer import PPOTrainer

    cfg = PPORunConfig(
        device=args.device, dtype="bfloat16", value_model=args.value_model, batch_size=64,
        minibatch_size=64, steps=1,
    )  # fmt: skip
    cfg.validate()
    prompts, policy, ref, reward_model, tokenizer = load_run_inputs(cfg, progress=False)
    trainer = PPOTrainer(policy, ref, reward_model, tokenizer, cfg)
    b = trainer.rollout(prompts[: cfg.batch_size])
    gap = (b.logprobs - b.ref_logprobs) * b.response_mask  # (B, R)
    kl, worst = gap.sum(1).mean().item(), gap.abs().max().item()
    trained = {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]}
    ok_kl = abs(kl) <= 1e-4
    ok_dtype = trained == {torch.float32}
    print(f"bf16 step-0 KL on {args.device}: {kl:.2e} nats/seq, largest token gap {worst:.2e}: "
          f"{'ok' if ok_kl else 'FAIL'}")  # fmt: skip
    print(f"trained parameter dtypes ({args.value_model} critic): {sorted(map(str, trained))}: "
          f"{'ok' if ok_dtype else 'FAIL'}")  # fmt: skip
    return 0 if ok_kl and ok_dtype else 1


if __name__ == "__main__":
    sys.exit(main())
