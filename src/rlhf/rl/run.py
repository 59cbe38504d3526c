"""`rlhf ppo`: load the models and prompts, run `PPOTrainer` for N steps, log, sample and save.

Also the seed's one-call form, `ppo_step(policy_model, reward_model, ref_model, prompts)`.
Loading the inputs is in `inputs`, live hacking detection in `detector`, checkpoints in
`checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import JsonlWriter, atomic_write_json, read_jsonl, write_jsonl
from ..errors import ConfigError, RLHFError
from ..models.reward_model import RewardModel
from ..tracking import RunLogger, progress_bar, save_config, set_seed
from .checkpoint import checkpoint_dirs, checkpoint_step, load_checkpoint, save_checkpoint
from .config import PPOConfig, PPORunConfig
from .detector import HackingDetector
from .distributed import Discard, check_world
from .inputs import load_run_inputs
from .launch import init_world
from .sharded_state import save_final_policy
from .trainer import NonFiniteError, PPOTrainer


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
    """Run PPO and save everything to `cfg.out`; returns the last step's metrics and paths.

    Under torchrun it runs on every process (`launch`); rank 0 alone prints and writes the logs.
    """
    from ..task.gold import GoldJudge

    cfg.validate()
    out = Path(cfg.out)
    world = init_world(cfg.device)
    check_world(cfg, world)
    main = world.is_main
    progress = progress and main
    if cfg.auto_resume:  # rank 0 decides, so that every process does the same
        cfg = dataclasses.replace(cfg, resume=world.broadcast_object(bool(checkpoint_dirs(out))))
    if cfg.resume:
        found = checkpoint_dirs(out)
        if not found:
            raise ConfigError(
                f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume"
            )
        # --auto-resume after the last checkpoint (a restart that came after it) only writes the
        # outputs that may be missing.
        if checkpoint_step(found[-1]) >= cfg.steps and not cfg.auto_resume:
            raise ConfigError(
                f"--resume: {found[-1]} is already at step {checkpoint_step(found[-1])}; "
                f"--steps {cfg.steps} leaves nothing to run"
            )
    prompts, policy, ref, reward_model, tokenizer = world.main_first(
        lambda: load_run_inputs(cfg, progress)
    )
    # Seeded after loading: on a cold cache, loading trains models first and draws from the RNG.
    set_seed(cfg.seed)
    builtin_prompts = cfg.prompts is None
    gold = GoldJudge() if (cfg.gold if cfg.gold is not None else builtin_prompts) else None
    trainer = PPOTrainer(policy, ref, reward_model, tokenizer, cfg, gold_judge=gold, world=world)
    stream = PromptStream(prompts, cfg.batch_size, cfg.seed)
    detector = HackingDetector()
    first_step = _resume(out, trainer, stream, detector) if cfg.resume else 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a fresh run replaces the folder's run; its checkpoints go with it
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        save_config(out, cfg)
    start = time.perf_counter()
    metrics: dict = {}
    if first_step >= cfg.steps:
        metrics = read_jsonl(out / "metrics.jsonl")[-1]
    bar = progress_bar(
        range(first_step, cfg.steps), desc=f"PPO (kl_coef {cfg.kl_coef:g})", disable=not progress,
        initial=first_step, total=cfg.steps,
    )  # fmt: skip
    resumed = first_step > 0
    step = first_step
    with (
        RunLogger(out, append=resumed) if main else Discard() as logger,
        JsonlWriter(out / "samples.jsonl", append=resumed) if main else Discard() as samples,
        _GracefulStop() as stop,
    ):

        def checkpoint(done: int) -> Path:
            rows = (
                [r for r in read_jsonl(out / "metrics.jsonl", allow_empty=True) if r["step"] < done]
                if main
                else []
            )
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
                if warning and main:
                    bar.write(f"warning: {warning}")
                if on_step is not None:
                    on_step(step, metrics)
                done = step + 1
                saved = None
                # The last step is checkpointed too, so that `--steps N --resume` can extend a
                # finished run from where it ended.
                if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                    saved = checkpoint(done)
                if done == cfg.steps:
                    break
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
    save_final_policy(
        trainer, tokenizer, out / "policy", merged=out / "policy-merged" if cfg.merge_lora else None
    )
    summary = {
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final": metrics,
        "hacking_step": detector.step,
        "hacking_warning": detector.message,
    }
    if main:
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
    if not trainer.world.is_main:  # rank 0 trims the logs
        return step
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
