"""`rlhf ppo`: load the models and prompts, run `PPOTrainer` for N steps, log, sample and save.

Also the seed's one-call form, `ppo_step(policy_model, reward_model, ref_model, prompts)`.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import JsonlWriter, atomic_write_json, read_prompts
from .errors import ConfigError
from .models import RewardModel
from .ppo import PPOConfig, PPOTrainer
from .tracking import RunLogger, progress_bar, save_config, set_seed


@dataclass
class PPORunConfig(PPOConfig):
    """Options of `rlhf ppo`: the PPO hyper-parameters plus inputs and outputs."""

    out: str = "runs/ppo"
    """output folder: metrics.jsonl, samples.jsonl, config.json, tensorboard/, policy/"""
    model: str | None = None
    """Hugging Face folder of the policy to start from (the SFT model); default: the built-in base model"""
    ref_model: str | None = None
    """frozen reference model folder; default: the same weights as --model"""
    reward_model: str | None = None
    """reward model folder from `rlhf train-reward`; default: the built-in task's (trained on first use)"""
    prompts: str | None = None
    """prompt file (.jsonl with a "prompt" field, or plain text, one per line); default: the built-in review openings"""
    max_prompt_tokens: int = 128
    """prompts longer than this keep their last tokens (with one warning)"""
    sample_every: int = 10
    """write example responses to samples.jsonl every this many steps"""
    gold: bool | None = None
    """score responses with the built-in gold judge (default: on for the built-in task only)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """cache for the built-in base and reward models"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""

    def validate(self) -> None:
        super().validate()
        if self.sample_every <= 0 or self.max_prompt_tokens <= 0:
            raise ConfigError("--sample-every and --max-prompt-tokens must be positive")


def default_reward_model_dir(cache_dir=None, seed: int = 0, progress: bool = True) -> Path:
    """The built-in task's reward model, trained with the default `RewardConfig` on first use."""
    from .reward import RewardConfig, train_reward
    from .task.default import BaseModelConfig, cache_key, default_cache_dir

    root = default_cache_dir(cache_dir)
    reward_fields = dataclasses.asdict(RewardConfig(seed=seed))
    for name in ("out", "device", "cache_dir"):
        reward_fields.pop(name)
    target = root / cache_key("reward", {"reward": reward_fields, "base": dataclasses.asdict(BaseModelConfig())})
    if (target / "reward_eval.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reward-", dir=root))
    try:
        train_reward(RewardConfig(out=str(staging), seed=seed, cache_dir=cache_dir), progress=progress)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _prompt_stream(prompts: list[str], batch_size: int, seed: int):
    """Batches drawn from shuffled passes over the prompt pool."""
    rng = random.Random(seed)
    pool: list[str] = []
    while True:
        if len(pool) < batch_size:
            fresh = list(prompts)
            rng.shuffle(fresh)
            pool += fresh
            continue
        batch, pool = pool[:batch_size], pool[batch_size:]
        yield batch


def load_run_inputs(cfg: PPORunConfig, progress: bool = True):
    """Prompts, policy, reference, reward model and tokenizer, validated before any training."""
    from .loading import load_causal_lm, load_tokenizer, match_vocab, pick_device

    device = pick_device(cfg.device)
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        from .task import corpus

        prompts = corpus.prompts(4096, seed=cfg.seed, split="train")
    if cfg.model:
        policy_dir = Path(cfg.model)
    else:
        from .task.default import base_model_dir

        policy_dir = base_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    tokenizer = load_tokenizer(policy_dir, trust_remote_code=cfg.trust_remote_code)
    policy = load_causal_lm(policy_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(policy, tokenizer, policy_dir)
    ref_dir = Path(cfg.ref_model) if cfg.ref_model else policy_dir
    ref = load_causal_lm(ref_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(ref, tokenizer, ref_dir)
    if cfg.reward_model:
        rm_dir = Path(cfg.reward_model)
    elif cfg.model:
        raise ConfigError("--model needs --reward-model (train one with `rlhf train-reward --model ...`)")
    else:
        rm_dir = default_reward_model_dir(cfg.cache_dir, seed=0, progress=progress)
        rm_dir = rm_dir / "reward_model"
    reward_model = RewardModel.from_pretrained(rm_dir, trust_remote_code=cfg.trust_remote_code)
    return prompts, policy.to(device), ref.to(device), reward_model.to(device), tokenizer


def train_ppo(
    cfg: PPORunConfig,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run PPO and save everything to `cfg.out`; returns the last step's metrics and paths."""
    from .task.gold import GoldJudge

    cfg.validate()
    set_seed(cfg.seed)
    prompts, policy, ref, reward_model, tokenizer = load_run_inputs(cfg, progress)
    builtin = cfg.model is None
    gold = GoldJudge() if (cfg.gold if cfg.gold is not None else builtin) else None
    long_prompts = sum(len(ids) > cfg.max_prompt_tokens for ids in tokenizer(prompts)["input_ids"])
    if long_prompts:
        print(f"warning: {long_prompts} prompts are longer than --max-prompt-tokens {cfg.max_prompt_tokens} and were truncated")
        prompts = [
            tokenizer.decode(ids[-cfg.max_prompt_tokens :], skip_special_tokens=True)
            for ids in tokenizer(prompts)["input_ids"]
        ]
    trainer = PPOTrainer(policy, ref, reward_model, tokenizer, cfg, gold_judge=gold)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, cfg)
    stream = _prompt_stream(prompts, cfg.batch_size, cfg.seed)
    start = time.perf_counter()
    metrics: dict = {}
    bar = progress_bar(range(cfg.steps), desc=f"PPO (kl_coef {cfg.kl_coef:g})", disable=not progress)
    with RunLogger(out) as logger, JsonlWriter(out / "samples.jsonl", append=False) as samples:
        for step in bar:
            metrics = trainer.step(next(stream))
            # Row `step` describes the policy after `step` updates: its rollout came before update step+1.
            logger.log(step, metrics)
            postfix = {"reward": f"{metrics['objective/reward']:.2f}", "kl": f"{metrics['objective/kl']:.2f}"}
            if "objective/gold" in metrics:
                postfix["gold"] = f"{metrics['objective/gold']:.2f}"
            bar.set_postfix(postfix, refresh=False)
            if step % cfg.sample_every == 0 or step == cfg.steps - 1:
                _write_samples(samples, step, trainer)
            if on_step is not None:
                on_step(step, metrics)
    trainer.policy.lm.save_pretrained(out / "policy", safe_serialization=True)
    tokenizer.save_pretrained(out / "policy")
    trainer.policy.save_value_head(out / "policy")
    summary = {"steps": cfg.steps, "seconds": round(time.perf_counter() - start, 1), "final": metrics}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _write_samples(writer: JsonlWriter, step: int, trainer: PPOTrainer, n: int = 8) -> None:
    b = trainer.last_rollout
    gold = getattr(trainer, "last_gold", None)
    for i in range(min(n, len(b.texts))):
        row = {
            "step": step,
            "prompt": b.prompts[i],
            "response": b.texts[i],
            "ended": b.ended[i],
            "reward": round(float(b.scores[i]), 4),
            "kl": round(float(((b.logprobs[i] - b.ref_logprobs[i]) * b.response_mask[i]).sum()), 4),
        }
        if gold is not None:
            row["gold"] = round(gold[i], 4)
        writer.write(row)


_TRAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ppo_step(
    policy_model,
    reward_model: RewardModel,
    ref_model,
    prompts: list[str],
    kl_coef: float = 0.1,
    tokenizer=None,
    config: PPOConfig | None = None,
) -> dict[str, float]:
    """One PPO update step, the seed's call form: sample, score, penalise KL, update; returns metrics.

    The trainer behind it (optimizer state, value head, KL controller) is kept per policy model, so
    repeated calls continue one run. The tokenizer defaults to the reward model's. For real runs use
    `PPOTrainer` (or `train_ppo`) directly.
    """
    tokenizer = tokenizer or getattr(reward_model, "tokenizer", None) or getattr(policy_model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("ppo_step needs a tokenizer: pass tokenizer= or set reward_model.tokenizer")
    trainer = _TRAINERS.get(policy_model)
    if trainer is None:
        config = config or PPOConfig(
            kl_coef=kl_coef, batch_size=len(prompts), minibatch_size=len(prompts), steps=1_000_000
        )
        trainer = PPOTrainer(policy_model, ref_model, reward_model, tokenizer, config)
        _TRAINERS[policy_model] = trainer
    trainer.kl_ctl.value = kl_coef if not trainer.config.adaptive_kl else trainer.kl_ctl.value
    with torch.enable_grad():
        return trainer.step(list(prompts))
