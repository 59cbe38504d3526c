"""`rlhf ppo`: load the models and prompts, run `PPOTrainer` for N steps, log, sample and save.

Also the seed's one-call form, `ppo_step(policy_model, reward_model, ref_model, prompts)`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checkpoint_dirs, checkpoint_step, load_checkpoint, save_checkpoint
from .data import JsonlWriter, atomic_write_json, read_jsonl, read_prompts, write_jsonl
from .errors import ConfigError, RLHFError
from .models import RewardModel
from .ppo import NonFiniteError, PPOConfig, PPOTrainer
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
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template as a user turn (the tokenizer must have one)"""
    sample_every: int = 10
    """write example responses to samples.jsonl every this many steps"""
    gold: bool | None = None
    """score responses with the built-in gold judge (default: on with the built-in prompts only)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """cache for the built-in base and reward models"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""
    save_every: int = 50
    """write a checkpoint every this many steps (0: only on Ctrl-C)"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    resume: bool = False
    """continue the run in --out from its last checkpoint"""

    def validate(self) -> None:
        super().validate()
        for name in ("sample_every", "max_prompt_tokens", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.save_every < 0:
            raise ConfigError(
                f"--save-every must be >= 0 (0: only on Ctrl-C), got {self.save_every}"
            )


def default_reward_model_dir(
    cache_dir=None, base_cfg=None, reward_cfg=None, progress: bool = True
) -> Path:
    """The built-in task's reward model folder (holding `reward_model/`), trained on first use.

    `base_cfg` (a `BaseModelConfig`) picks the base model it starts from; `reward_cfg` (a
    `RewardConfig`) its training options. The cache key covers both.
    """
    from .reward import RewardConfig, train_reward
    from .task.default import BaseModelConfig, base_model_dir, cache_key, default_cache_dir

    base_cfg = base_cfg or BaseModelConfig()
    reward_cfg = reward_cfg or RewardConfig()
    root = default_cache_dir(cache_dir)
    reward_fields = dataclasses.asdict(reward_cfg)
    for name in ("out", "device", "cache_dir", "model", "data"):
        reward_fields.pop(name)
    target = root / cache_key(
        "reward", {"reward": reward_fields, "base": dataclasses.asdict(base_cfg)}
    )
    if (target / "reward_eval.json").is_file():
        return target
    base_dir = base_model_dir(base_cfg, cache_dir=cache_dir, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reward-", dir=root))
    try:
        cfg = dataclasses.replace(
            reward_cfg, out=str(staging), model=str(base_dir), data=None, cache_dir=cache_dir
        )
        train_reward(cfg, progress=progress)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class HackingDetector:
    """Warns once, live, when the proxy reward keeps rising while true quality falls.

    Tracks exponential moving averages (weight `smooth`) of the proxy reward, the gold score (when
    there is one) and distinct-2. Hacking is declared at the first step, after `warmup`, where the
    proxy's average is at its running maximum (still rising) while the gold average has fallen
    `gold_drop` below its peak or, without a gold judge, distinct-2 has fallen to
    `diversity_drop` times its peak.
    """

    def __init__(
        self,
        smooth: float = 0.8,
        warmup: int = 10,
        gold_drop: float = 0.1,
        diversity_drop: float = 0.75,
    ):
        self.smooth, self.warmup = smooth, warmup
        self.gold_drop, self.diversity_drop = gold_drop, diversity_drop
        self.avg: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.step: int | None = None
        self.message: str | None = None

    def update(self, step: int, metrics: dict) -> str | None:
        """Feed one step's metrics; returns the warning the first time hacking is detected."""
        for key in ("objective/reward", "objective/gold", "text/distinct_2"):
            if metrics.get(key) is None:
                continue
            prev = self.avg.get(key, metrics[key])
            self.avg[key] = self.smooth * prev + (1 - self.smooth) * metrics[key]
            self.peak[key] = max(self.peak.get(key, self.avg[key]), self.avg[key])
        if self.step is not None or step < self.warmup:
            return None
        reward = self.avg["objective/reward"]
        if reward < self.peak["objective/reward"] - 1e-9:
            return None
        reasons = []
        if (
            "objective/gold" in self.avg
            and self.avg["objective/gold"] < self.peak["objective/gold"] - self.gold_drop
        ):
            reasons.append(
                f"the gold score fell from {self.peak['objective/gold']:.2f} to {self.avg['objective/gold']:.2f}"
            )
        # With a gold judge its score is the verdict; text diversity is the signal only without
        # one (a well-behaved policy's positive reviews are also less varied than the base model's).
        if (
            "objective/gold" not in self.avg
            and "text/distinct_2" in self.avg
            and self.avg["text/distinct_2"] < self.diversity_drop * self.peak["text/distinct_2"]
        ):
            reasons.append(
                f"distinct-2 fell from {self.peak['text/distinct_2']:.2f} to {self.avg['text/distinct_2']:.2f}"
            )
        if not reasons:
            return None
        self.step = step
        self.message = (
            f"reward hacking at step {step}: the proxy reward is still rising ({reward:.2f}) but "
            + " and ".join(reasons)
            + "; the policy is exploiting the reward model (raise --kl-coef or stop here)"
        )
        return self.message


class PromptStream:
    """Batches drawn from shuffled passes over the prompt pool; its position can be saved."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts, self.batch_size = list(prompts), batch_size
        self.rng = random.Random(seed)
        self.pool: list[str] = []

    def next(self) -> list[str]:
        while len(self.pool) < self.batch_size:
            fresh = list(self.prompts)
            self.rng.shuffle(fresh)
            self.pool += fresh
        batch, self.pool = self.pool[: self.batch_size], self.pool[self.batch_size :]
        return batch

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng_version": version,
            "rng_internal": list(internal),
            "rng_gauss": gauss,
            "pool": list(self.pool),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["rng_version"], tuple(state["rng_internal"]), state["rng_gauss"]))
        self.pool = list(state["pool"])


def load_run_inputs(cfg: PPORunConfig, progress: bool = True):
    """Prompts, policy, reference, reward model and tokenizer, validated before any training.

    The prompts come back truncated to --max-prompt-tokens and, with --chat-template, wrapped in
    the tokenizer's chat template.
    """
    from .generation import apply_chat_template, truncate_prompts
    from .loading import check_model_dir, load_causal_lm, load_tokenizer, match_vocab, pick_device
    from .models import check_reward_model_dir

    # Cheap checks first, so that a wrong path fails in a second rather than after loading models.
    device = pick_device(cfg.device)
    if cfg.model and not cfg.reward_model:
        raise ConfigError(
            "--model needs --reward-model (train one with `rlhf train-reward --model ...`)"
        )
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    for directory in (cfg.model, cfg.ref_model):
        if directory:
            check_model_dir(directory)
    if cfg.reward_model:
        check_reward_model_dir(cfg.reward_model)
    if prompts is None:
        from .task import corpus

        prompts = corpus.prompts(4096, seed=cfg.seed, split="train")
    if cfg.model:
        policy_dir = Path(cfg.model)
    else:
        from .task.default import base_model_dir

        policy_dir = base_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    tokenizer = load_tokenizer(policy_dir, trust_remote_code=cfg.trust_remote_code)
    prompts, n_cut = truncate_prompts(tokenizer, prompts, cfg.max_prompt_tokens)
    if n_cut:
        print(
            f"warning: {n_cut} of {len(prompts)} prompts are longer than --max-prompt-tokens "
            f"{cfg.max_prompt_tokens}; they keep their last tokens"
        )
    if cfg.chat_template:
        prompts = apply_chat_template(tokenizer, prompts, f"the tokenizer in {policy_dir}")
    policy = load_causal_lm(policy_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(policy, tokenizer, policy_dir)
    ref_dir = Path(cfg.ref_model) if cfg.ref_model else policy_dir
    ref = load_causal_lm(ref_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(ref, tokenizer, ref_dir)
    if cfg.reward_model:
        rm_dir = Path(cfg.reward_model)
    else:
        rm_dir = default_reward_model_dir(cfg.cache_dir, progress=progress) / "reward_model"
    reward_model = RewardModel.from_pretrained(rm_dir, trust_remote_code=cfg.trust_remote_code)
    return prompts, policy.to(device), ref.to(device), reward_model.to(device), tokenizer


class _GracefulStop:
    """Ctrl-C handling for the training loop: the first SIGINT asks the loop to stop after the step
    in progress (so the checkpoint is of a finished update, never half of one); a second one
    raises KeyboardInterrupt at once. Installed only in the main thread; the previous handler is
    restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler that prints while the loop is printing can raise.
        os.write(
            2,
            b"\nCtrl-C: stopping after this step to write a checkpoint (Ctrl-C again stops at once)\n",
        )

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
            self._installed = False


def train_ppo(
    cfg: PPORunConfig,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run PPO and save everything to `cfg.out`; returns the last step's metrics and paths."""
    from .task.gold import GoldJudge

    cfg.validate()
    out = Path(cfg.out)
    if cfg.resume:
        found = checkpoint_dirs(out)
        if not found:
            raise ConfigError(
                f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume"
            )
        if checkpoint_step(found[-1]) >= cfg.steps:
            raise ConfigError(
                f"--resume: {found[-1]} is already at step {checkpoint_step(found[-1])}; "
                f"--steps {cfg.steps} leaves nothing to run"
            )
    set_seed(cfg.seed)
    prompts, policy, ref, reward_model, tokenizer = load_run_inputs(cfg, progress)
    builtin_prompts = cfg.prompts is None
    gold = GoldJudge() if (cfg.gold if cfg.gold is not None else builtin_prompts) else None
    trainer = PPOTrainer(policy, ref, reward_model, tokenizer, cfg, gold_judge=gold)
    stream = PromptStream(prompts, cfg.batch_size, cfg.seed)
    detector = HackingDetector()
    first_step = _resume(out, trainer, stream, detector) if cfg.resume else 0
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # a fresh run replaces the folder's run; its checkpoints go with it
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    save_config(out, cfg)
    start = time.perf_counter()
    metrics: dict = {}
    bar = progress_bar(
        range(first_step, cfg.steps), desc=f"PPO (kl_coef {cfg.kl_coef:g})", disable=not progress,
        initial=first_step, total=cfg.steps,
    )  # fmt: skip
    resumed = first_step > 0
    step = first_step
    with (
        RunLogger(out, append=resumed) as logger,
        JsonlWriter(out / "samples.jsonl", append=resumed) as samples,
        _GracefulStop() as stop,
    ):

        def checkpoint(done: int) -> Path:
            rows = [
                r for r in read_jsonl(out / "metrics.jsonl", allow_empty=True) if r["step"] < done
            ]
            extra = {
                "stream": stream.state_dict(),
                "detector": dict(vars(detector)),
                "metrics": rows,
            }
            return save_checkpoint(out, done, trainer, extra, keep=cfg.keep_checkpoints)

        try:
            for step in bar:
                metrics = trainer.step(stream.next())
                # Row `step` describes the policy after `step` updates: its rollout came first.
                logger.log(step, metrics)
                postfix = {
                    "reward": f"{metrics['objective/reward']:.2f}",
                    "kl": f"{metrics['objective/kl']:.2f}",
                }
                if "objective/gold" in metrics:
                    postfix["gold"] = f"{metrics['objective/gold']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                if step % cfg.sample_every == 0 or step == cfg.steps - 1:
                    _write_samples(samples, step, trainer)
                warning = detector.update(step, metrics)
                if warning:
                    bar.write(f"warning: {warning}")
                if on_step is not None:
                    on_step(step, metrics)
                done = step + 1
                if done == cfg.steps:
                    break  # finished: the final save below is the checkpoint
                saved = None
                if cfg.save_every and done % cfg.save_every == 0:
                    saved = checkpoint(done)
                if stop.requested:
                    saved = saved or checkpoint(done)
                    raise Interrupted(
                        f"interrupted after {done} of {cfg.steps} steps; saved checkpoint {saved}. "
                        "Continue with the same command plus --resume"
                    )
        except KeyboardInterrupt:
            # A second Ctrl-C: the step in progress may have changed weights half-way, so nothing
            # is saved; the newest checkpoint is where to continue from.
            last = checkpoint_dirs(out)
            raise Interrupted(
                f"interrupted during step {step + 1} of {cfg.steps}; continue from checkpoint "
                f"{last[-1]} with the same command plus --resume"
                if last
                else f"interrupted during step {step + 1} of {cfg.steps}, before the first "
                "checkpoint; run the command again to start over"
            ) from None
        except NonFiniteError as exc:
            last = checkpoint_dirs(out)
            kept = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise NonFiniteError(f"{exc}{kept}") from None
        finally:
            bar.close()
    trainer.policy.lm.save_pretrained(out / "policy", safe_serialization=True)
    tokenizer.save_pretrained(out / "policy")
    trainer.policy.save_value_head(out / "policy")
    summary = {
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final": metrics,
        "hacking_step": detector.step,
        "hacking_warning": detector.message,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


class Interrupted(RLHFError):
    """Ctrl-C during training; the message says which checkpoint to resume from.

    The CLI exits with `exit_code` 130 (128 + SIGINT), as shells expect of an interrupted command.
    """

    exit_code = 130


def _resume(out: Path, trainer: PPOTrainer, stream: PromptStream, detector: HackingDetector) -> int:
    """Load the newest checkpoint and trim the logs to the steps it covers; returns the next step."""
    found = checkpoint_dirs(out)
    if not found:
        raise ConfigError(
            f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume"
        )
    state = load_checkpoint(found[-1], trainer)
    stream.load_state_dict(state["stream"])
    vars(detector).update(state["detector"])
    step = int(state["step"])
    # The checkpoint holds the metrics up to its step; the logs are cut back to them, so the rows
    # of steps that ran after it (and were lost with the run) are written again by this one.
    if "metrics" in state:
        write_jsonl(out / "metrics.jsonl", state["metrics"])
    names = ("samples.jsonl",) if "metrics" in state else ("metrics.jsonl", "samples.jsonl")
    for name in names:
        path = out / name
        if path.exists():
            rows = [r for r in read_jsonl(path, allow_empty=True) if r["step"] < step]
            write_jsonl(path, rows)
    print(f"resuming from {found[-1]} (step {step})")
    return step


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
    tokenizer = (
        tokenizer
        or getattr(reward_model, "tokenizer", None)
        or getattr(policy_model, "tokenizer", None)
    )
    if tokenizer is None:
        raise ValueError(
            "ppo_step needs a tokenizer: pass tokenizer= or set reward_model.tokenizer"
        )
    # The trainer lives on the policy object itself, so it is freed with it (a WeakKeyDictionary
    # would keep both alive: the trainer refers back to the policy).
    trainer = policy_model.__dict__.get("_rlhf_ppo_trainer")
    if trainer is None:
        config = config or PPOConfig(
            kl_coef=kl_coef, batch_size=len(prompts), minibatch_size=len(prompts), steps=1_000_000
        )
        trainer = PPOTrainer(policy_model, ref_model, reward_model, tokenizer, config)
        policy_model.__dict__["_rlhf_ppo_trainer"] = trainer
    trainer.kl_ctl.value = kl_coef if not trainer.config.adaptive_kl else trainer.kl_ctl.value
    with torch.enable_grad():
        return trainer.step(list(prompts))
