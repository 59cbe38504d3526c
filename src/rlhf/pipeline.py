"""`rlhf demo`: every stage of the built-in task in order, reusing what is cached."""

from __future__ import annotations

import time
from pathlib import Path

from .reward import RewardConfig, train_reward
from .task.default import base_model_dir, base_model_info


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 0, cache_dir=None, device: str = "auto") -> dict:
    """Base model -> preferences -> reward model; prints what it made and returns a summary."""
    start = time.perf_counter()
    out_dir = Path(out)
    base_dir = base_model_dir(cache_dir=cache_dir)
    info = base_model_info(base_dir)
    print(f"base model: {base_dir} (held-out perplexity {info['heldout_perplexity']:.2f})")
    for sample in info["samples"][:3]:
        print(f"  sample: {sample}")
    reward_cfg = RewardConfig(out=str(out_dir / "reward"), seed=seed, cache_dir=cache_dir, device=device)
    if quick:
        reward_cfg.n_pairs, reward_cfg.epochs, reward_cfg.normalise_samples = 800, 1, 128
    result = train_reward(reward_cfg)
    print(
        f"reward model: {out_dir / 'reward' / 'reward_model'} "
        f"(held-out accuracy {result['accuracy']:.3f}, label ceiling {result['ceiling']:.3f})"
    )
    print(f"done in {time.perf_counter() - start:.0f} s; outputs in {out_dir}")
    return {"base": info, "reward": result}
