"""`rlhf ppo`: load the models and prompts, run `PPOTrainer` for N steps, log, sample and save.

Loading the inputs is in `inputs`, live hacking detection in `detector`, checkpoints in
`checkpoint`; the seed's one-call form, `ppo_step`, is in `step` (and importable from here).
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

from ..data import JsonlWriter, atomic_write_json, read_jsonl, write_jsonl
from ..errors import ConfigError, RLHFError
from ..reward.sources import RewardError, RewardUnavailable
from ..tracking import (
    RunLogger,
    progress_bar,
    quiet_transformers_bars,
    save_config,
    set_seed,
    tracking,
)
from .checkpoint import (
    check_resume_options,
    checkpoint_dirs,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
)
from .config import METHOD_NAMES, PPORunConfig
from .detector import HackingDetector
from .distributed import Discard, PeerFailed, check_world
from .inputs import load_run
from .launch import init_world, leave_together
from .sharded_state import save_final_policy
from .step import ppo_step as ppo_step  # re-exported
from .trainer import PPOTrainer
from .update import NonFiniteError


class PromptStream:
    """Batches drawn from shuffled passes over the prompt pool; its position can be saved.

    The pool holds the prompts' indices, so a batch brings its records' other fields (`columns`,
    for reward functions) along with the prompts."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int, columns: dict | None = None):
        self.prompts, self.batch_size = list(prompts), batch_size
        self.columns = columns or {}
        self.rng = random.Random(seed)
        self.pool: list[int] = []

    def next_rows(self) -> list[int]:
        """The indices of the next batch's prompts."""
        while len(self.pool) < self.batch_size:
            fresh = list(range(len(self.prompts)))
            self.rng.shuffle(fresh)  # the same permutation a shuffle of the prompts would make
            self.pool += fresh
        batch, self.pool = self.pool[: self.batch_size], self.pool[self.batch_size :]
        return batch

    def next(self) -> list[str]:
        return self.batch(self.next_rows())[0]

    def batch(self, rows: list[int]) -> tuple[list[str], dict[str, list]]:
        """The prompts and columns of these rows."""
        columns = {name: [vs[i] for i in rows] for name, vs in self.columns.items()}
        return [self.prompts[i] for i in rows], columns

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
        pool = list(state["pool"])
        if pool and isinstance(pool[0], str):  # a checkpoint from before the pool held indices
            first = {p: i for i, p in reversed(list(enumerate(self.prompts)))}
            pool = [first[p] for p in pool]
        self.pool = pool


class _GracefulStop:
    """Ctrl-C and SIGTERM handling for the training loop: the first signal asks the loop to stop
    after the step in progress (so the checkpoint is of a finished update, never half of one); a
    second one raises KeyboardInterrupt at once. SIGTERM is what schedulers (Slurm, Kubernetes)
    send before they kill a job, and what some torch versions' torchrun sends its workers when it
    is interrupted (2.13's passes Ctrl-C on as SIGINT). Installed only in the main thread; the
    previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, speak: bool = True):
        self.requested, self.speak = False, speak
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if not self.speak:  # under torchrun, rank 0 alone
            return
        # os.write, not print: a handler that prints while the loop is printing can raise.
        os.write(
            2,
            f"\n{name}: stopping after this step to write a checkpoint "
            f"({name} again stops at once)\n".encode(),
        )

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def train_ppo(
    cfg: PPORunConfig,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    label: str | None = None,
    figures: Callable[[Path], list[Path]] | None = None,
) -> dict:
    """Run PPO and save everything to `cfg.out`; returns a summary of the run.

    Without `cfg.resume`, an earlier run in `cfg.out` is replaced (its files are listed in one
    printed line); with it, the run continues from its newest checkpoint. `label` names the run
    on its progress bar (default "METHOD (kl_coef B)": PPO, RLOO, GRPO, ... after the estimator). The summary's `steps` counts the steps run
    by this call; `first_step` is where it started (0, or the checkpoint it resumed from). Under
    torchrun it runs on every process (`launch`); rank 0 alone prints and writes the outputs.
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
        check_resume_options(found[-1], cfg)
        # --auto-resume after the last checkpoint (a restart that came after it) only writes the
        # outputs that may be missing.
        if checkpoint_step(found[-1]) >= cfg.steps and not cfg.auto_resume:
            raise ConfigError(
                f"--resume: {found[-1]} is already at step {checkpoint_step(found[-1])}; "
                f"--steps {cfg.steps} leaves nothing to run"
            )
    try:
        inputs = world.main_first(lambda: load_run(cfg, progress))
    except PeerFailed:
        leave_together()  # rank 0 failed and told every process
        raise
    except BaseException:
        if world.is_main:  # main_first told the others; a rank > 0 that fails here is alone
            leave_together()
        raise
    # Seeded after loading: on a cold cache, loading trains models first and draws from the RNG.
    set_seed(cfg.seed)
    builtin_prompts = cfg.prompts is None
    judge = GoldJudge
    if cfg.task == "arithmetic":
        from ..task.arithmetic import ArithmeticJudge as judge
    gold = judge() if (cfg.gold if cfg.gold is not None else builtin_prompts) else None
    tokenizer = inputs.tokenizer
    trainer = PPOTrainer(
        inputs.policy, inputs.ref, inputs.reward_model, tokenizer, cfg, gold_judge=gold,
        world=world, reward_terms=inputs.reward_terms, reward_model_weight=cfg.reward_model_weight,
    )  # fmt: skip
    stream = PromptStream(inputs.prompts, cfg.batch_size, cfg.seed, inputs.columns)
    detector = HackingDetector()
    first_step = _resume(out, trainer, stream, detector) if cfg.resume else 0
    if main:
        if not cfg.resume:
            replaced = replace_earlier_run(out)
            if replaced:
                print(
                    f"{out} held an earlier run: replaced its {', '.join(replaced)} "
                    "(--resume continues a run instead)"
                )
        out.mkdir(parents=True, exist_ok=True)
        save_config(out, cfg, command="ppo")
    start = time.perf_counter()
    metrics: dict = {}
    if first_step >= cfg.steps:
        metrics = read_jsonl(out / "metrics.jsonl")[-1]
    # Updated by hand after each step: a `for` over the bar would stop it at N-1 of N, since the
    # loop leaves by `break` before tqdm counts the last step.
    bar = progress_bar(
        total=cfg.steps, initial=first_step, disable=not progress,
        desc=label or f"{METHOD_NAMES[cfg.advantage_estimator]} (kl_coef {cfg.kl_coef:g})",
    )  # fmt: skip
    resumed = first_step > 0
    step = first_step
    kls: list[float] = []  # this call's steps, for `stalled`
    with (
        RunLogger(out, append=resumed, **tracking(cfg, figures)) if main else Discard() as logger,
        JsonlWriter(out / "samples.jsonl", append=resumed) if main else Discard() as samples,
        _GracefulStop(speak=main) as stop,
    ):

        def checkpoint(done: int, stream_state: dict | None = None) -> Path:
            rows = (
                [r for r in read_jsonl(out / "metrics.jsonl", allow_empty=True) if r["step"] < done]
                if main
                else []
            )
            extra = {
                "stream": stream_state or stream.state_dict(),
                "detector": detector.state_dict(),
                "metrics": rows,
            }
            return save_checkpoint(out, done, trainer, extra, keep=cfg.keep_checkpoints)

        try:
            for step in range(first_step, cfg.steps):
                # Where the step starts, for a checkpoint of it if its reward cannot be had.
                before = (stream.state_dict(), trainer.generator.get_state())
                metrics = trainer.step(*stream.batch(stream.next_rows()))
                # Row `step` describes the policy after `step` updates: its rollout came first.
                logger.log(step, metrics)
                postfix = {
                    "reward": f"{metrics['objective/reward']:.2f}",
                    "kl": f"{metrics['objective/kl']:.2f}",
                }
                if "objective/gold" in metrics:
                    postfix["gold"] = f"{metrics['objective/gold']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update()
                if step % cfg.sample_every == 0 or step == cfg.steps - 1:
                    _write_samples(samples, step, trainer)
                warning = detector.update(step, metrics)
                if warning and main:
                    bar.write(f"warning: {warning}")
                kls.append(metrics["objective/kl"])
                if main and (still := stalled(kls, cfg)):
                    bar.write(f"warning: {still}")
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
                # Every process stops after the same step, or the others would wait for it
                # in the next step's collectives (one signal may reach them a step apart).
                if world.any_process(stop.requested):
                    saved = saved or checkpoint(done)
                    leave_together()
                    raise Interrupted(
                        f"interrupted after {done} of {cfg.steps} steps; saved checkpoint {saved}",
                        resumable=True,
                    )
        except KeyboardInterrupt:
            # A second Ctrl-C: the step in progress may have changed weights half-way, so nothing
            # is saved; the newest checkpoint is where to continue from.
            last = checkpoint_dirs(out)
            where = f"interrupted during step {step + 1} of {cfg.steps}"
            if not last:
                raise Interrupted(
                    f"{where}, before the first checkpoint; run the command again to start over"
                ) from None
            raise Interrupted(
                f"{where}; the newest checkpoint is {last[-1]}", resumable=True
            ) from None
        except (NonFiniteError, RewardError) as exc:
            # Raised before the step's update: the weights are those of the last finished step.
            last = checkpoint_dirs(out)
            kept = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise type(exc)(f"{exc}{kept}") from None
        except RewardUnavailable as exc:
            # The reward went away (a server): nothing is wrong with the run, so it is saved as
            # it was when this step began (its prompts and sampling draws not yet used) and can
            # continue with --resume once the reward is back.
            trainer.generator.set_state(before[1])
            saved = checkpoint(step, stream_state=before[0])
            leave_together()
            raise RewardLost(
                f"{exc}; saved checkpoint {saved} (step {step} of {cfg.steps})", resumable=True
            ) from None
        finally:
            bar.close()
    with quiet_transformers_bars():
        merged = out / "policy-merged" if cfg.merge_lora else None
        save_final_policy(trainer, tokenizer, out / "policy", merged=merged)
    summary = {
        "steps": cfg.steps - first_step,  # run by this call; a resumed run started at first_step
        "first_step": first_step,
        "total_steps": cfg.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final": metrics,
        "hacking_step": detector.step,
        "hacking_warning": detector.message,
        "hacking_signals": dict(detector.fired),  # the first step of each signal
    }
    if main:
        atomic_write_json(out / "summary.json", summary)
    # The processes leave together, none tearing its process group down while another still
    # writes; under the CLI each then ends with `launch.exit_worker`.
    world.barrier()
    leave_together()
    return summary


STALL_STEPS = 10
STALL_KL = 0.01
"""nats per response: the KL a policy that learns passes within STALL_STEPS steps (on the built-in
task, full fine-tuning at 3e-5 reached 0.22 by then and a rank-8 adapter at 3e-4 0.18, where one at
3e-5 stayed within 0.006)"""


def stalled(kls: list[float], cfg: PPORunConfig) -> str | None:
    """A warning, once (after STALL_STEPS steps), when the policy has not left the reference."""
    if len(kls) != STALL_STEPS or max(abs(k) for k in kls) >= STALL_KL:
        return None
    hint = (
        f"a LoRA adapter needs a larger --lr than full fine-tuning; try 10x this run's {cfg.lr:g}"
        if cfg.lora_r
        else f"try a larger --lr than {cfg.lr:g}"
    )
    return (
        f"after {STALL_STEPS} steps the policy has hardly moved from the reference (KL at most "
        f"{max(abs(k) for k in kls):.3f} nats per response), so it is learning next to nothing: "
        f"{hint}, unless a large --kl-coef ({cfg.kl_coef:g} here) is meant to hold it there"
    )


class Interrupted(RLHFError):
    """Ctrl-C during training; the message says which checkpoint to resume from.

    `what` says what happened; when `resumable`, the message adds how to continue (the CLI
    replaces that part with the exact command). The CLI exits with `exit_code` 130 (128 + SIGINT),
    as shells expect of an interrupted command.
    """

    exit_code = 130

    def __init__(self, what: str, resumable: bool = False):
        self.what, self.resumable = what, resumable
        tail = ". Continue by running it again with --resume (resume=True)" if resumable else ""
        super().__init__(what + tail)


class RewardLost(Interrupted):
    """The reward source went away mid-run (a server, after its retries); the run was saved as it
    was when the failing step began. Exit code 75, EX_TEMPFAIL: try again later (sysexits.h)."""

    exit_code = 75


# What a run writes into its folder; a new run without --resume removes these first, so nothing
# of the earlier run (TensorBoard event files especially, which accumulate) mixes with the new one.
RUN_OUTPUTS = (
    "metrics.jsonl", "samples.jsonl", "config.json", "config.yaml", "summary.json", "tensorboard", "checkpoints",
    "policy", "reward_kl_tradeoff.png", "training_diagnostics.png", "trackers.json",
    "eval", "generations.jsonl",  # `rlhf eval` and `rlhf generate` of the earlier policy
)  # fmt: skip


def replace_earlier_run(out: Path) -> list[str]:
    """Remove what an earlier run wrote into `out` (only those names); returns what was there.

    Only a folder that holds a run (its metrics.jsonl, written at the start, or checkpoints) is
    touched: a `policy/` of the user's own in a folder that never held a run stays.
    """
    if not ((out / "metrics.jsonl").is_file() or (out / "checkpoints").is_dir()):
        return []
    replaced = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            replaced.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            replaced.append(name)
    return replaced


def _resume(out: Path, trainer: PPOTrainer, stream: PromptStream, detector: HackingDetector) -> int:
    """Load the newest checkpoint and trim the logs to the steps it covers; returns the next step."""
    found = checkpoint_dirs(out)
    if not found:
        raise ConfigError(
            f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume"
        )
    state = load_checkpoint(found[-1], trainer)
    stream.load_state_dict(state["stream"])
    detector.load_state_dict(state["detector"])
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
        names = trainer.rewards.names
        if b.reward_terms is not None and names != ["reward_model"]:  # each term's say
            values = b.reward_terms[i].tolist()
            row["terms"] = {n: None if v != v else round(v, 4) for n, v in zip(names, values)}
        writer.write(row)
