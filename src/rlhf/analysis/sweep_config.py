"""`SweepConfig`, the options of `rlhf sweep`, and the plan they describe, apart from the sweep
itself so that the command line can read them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..rl.config import GROUP_ESTIMATORS

RL_METHODS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp")
METHODS = (*RL_METHODS, "dpo", "best_of_n")
DEFENCES = ("none", "mean", "min", "uwo", "shaping")
ENSEMBLE_DEFENCES = ("mean", "min", "uwo")


@dataclass
class SweepPlan:
    """What `rlhf sweep` runs."""

    methods: list[str] = field(default_factory=lambda: ["gae", "best_of_n"])
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.03, 0.1, 0.3])
    dpo_betas: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])
    seeds: int = 1
    steps: int = 60
    sequences: int = 64
    samples_per_prompt: int = 4
    bon_prompts: int = 64
    bon_n_max: int = 64
    defences: list[str] = field(default_factory=lambda: ["none"])
    uncertainty_coef: float = 1.0


@dataclass
class SweepConfig:
    """Options of `rlhf sweep`."""

    algos: str = "gae,best_of_n"
    """comma-separated methods, from gae,rloo,grpo,dr_grpo,reinforce_pp,dpo,best_of_n"""
    kl_coefs: str = "0,0.01,0.03,0.1,0.3"
    """comma-separated KL coefficients of the RL methods"""
    dpo_betas: str = "0.03,0.1,0.3"
    """comma-separated DPO betas"""
    defences: str = "none"
    """comma-separated defences against over-optimisation, each a variation of every RL run: none (the single reward model), mean, min or uwo (the built-in ensemble of 4 reward models, combined by that --reward-ensemble rule), shaping (--reward-shaping par)"""
    uncertainty_coef: float = 1.0
    """lambda of the uwo defence. Each member's scores are normalised to mean 0 and std 1 on the base model's samples, so the variance penalty is in those units squared: 1 costs little where the members agree (a std of 0.3 between them costs 0.09) and one std of reward where they disagree by one std"""
    seeds: int = 1
    """seeds per setting: --seed, --seed + 1, ..."""
    steps: int = 60
    """steps per RL run"""
    lr: float = 1e-4
    """learning rate of the RL runs"""
    sequences: int = 64
    """responses sampled per RL step, for every method"""
    samples_per_prompt: int = 4
    """k for rloo, grpo and dr_grpo: --sequences / k prompts, k samples each"""
    out: str = "runs/sweep"
    """output folder: sweep.png, sweep.json and one folder per run"""
    seed: int = 0
    """first seed"""
    cache_dir: str | None = None
    """cache for the built-in base and reward models"""
    report_to: str = "tensorboard"
    """where each run's metrics go besides its metrics.jsonl: tensorboard, wandb, mlflow, trackio or none, several comma-separated (one tracker run per sweep run)"""

    def plan(self) -> SweepPlan:
        """The plan these options describe; a bad option is a one-line `ConfigError`."""
        methods = [m.strip() for m in self.algos.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(
                f"--algos: unknown method {unknown[0] if unknown else self.algos!r}; choose from "
                f"{','.join(METHODS)}"
            )
        defences = [d.strip() for d in self.defences.split(",") if d.strip()]
        unknown = [d for d in defences if d not in DEFENCES]
        if unknown or not defences or len(set(defences)) < len(defences):
            problem = f"unknown defence {unknown[0]!r}" if unknown else f"got {self.defences!r}"
            raise ConfigError(
                f"--defences: {problem}; give one or more, each once, of {','.join(DEFENCES)}"
            )
        if not (math.isfinite(self.uncertainty_coef) and self.uncertainty_coef >= 0):
            raise ConfigError(
                f"--uncertainty-coef must be a finite number >= 0, got {self.uncertainty_coef}"
            )
        for name in ("steps", "seeds", "sequences"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if any(m in GROUP_ESTIMATORS for m in methods):
            from ..core import check_samples_per_prompt  # torch: only when it is needed

            check_samples_per_prompt(
                self.samples_per_prompt, self.sequences, "a group method of --algos"
            )
        return SweepPlan(
            methods=methods, kl_coefs=_numbers(self.kl_coefs, "--kl-coefs"),
            dpo_betas=_numbers(self.dpo_betas, "--dpo-betas"), seeds=self.seeds, steps=self.steps,
            sequences=self.sequences, samples_per_prompt=self.samples_per_prompt,
            defences=defences, uncertainty_coef=self.uncertainty_coef,
        )  # fmt: skip


def _numbers(text: str, option: str) -> list[float]:
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"{option}: expected comma-separated numbers such as 0,0.03,0.1, got {text!r}"
        ) from None
    if not numbers or any(not math.isfinite(c) or c < 0 for c in numbers):
        raise ConfigError(f"{option}: expected one or more numbers >= 0, got {text!r}")
    return numbers
