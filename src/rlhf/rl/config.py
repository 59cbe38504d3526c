"""PPO's configuration and KL controllers: `PPOConfig` (hyper-parameters, validated up front),
`FixedKLController` and `AdaptiveKLController` (the KL coefficient beta, fixed or adapted).

`PPORunConfig` adds the inputs and outputs of `rlhf ppo` (`run.train_ppo`).
Item numbers ("ppo-details 19") refer to docs/ppo-details.md.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from ..models.lora_args import LoraArgs
from ..trackers import TrackingArgs
from .rollout_args import RolloutArgs

KLEstimatorChoice = Literal["auto", "k1", "k2", "k3", "exact"]
PPO_LR = 3e-5
"""full fine-tuning (lm-human-preferences' and TRL's PPO default was 1.41e-5 to 3e-5)"""
PPO_LORA_LR = 3e-4
"""LoRA: ten times PPO_LR; the optimum for LoRA sits about 10x above full fine-tuning's in SFT and
RL alike (Schulman et al., "LoRA Without Regret", Thinking Machines 2025)"""
CRITIC_FREE = ("rloo", "grpo", "dr_grpo", "reinforce_pp")
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo")
# What a run is called on its progress bar and in messages: the estimator names the method.
METHOD_NAMES = {
    "gae": "PPO", "rloo": "RLOO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "reinforce_pp": "REINFORCE++",
}  # fmt: skip


@dataclass
class PPOConfig(RolloutArgs):
    """Hyper-parameters of the PPO update (defaults follow lm-human-preferences and TRL)."""

    steps: int = 100
    """PPO steps (each: one rollout batch, then several epochs of updates on it)"""
    batch_size: int = 64
    """prompts per rollout batch"""
    minibatch_size: int = 64
    """sequences per gradient step; must divide --batch-size"""
    ppo_epochs: int = 4
    """passes over each rollout batch (ppo-details 19)"""
    response_tokens: int = 24
    """longest response, in tokens"""
    temperature: float = 1.0
    """sampling temperature; log-probs use the same temperature (ppo-details 1)"""
    top_k: int = 0
    """must stay 0: PPO refuses top-k sampling (the ratio and the KL would describe another policy)"""
    top_p: float = 1.0
    """must stay 1.0: PPO refuses nucleus sampling (the ratio and the KL would describe another policy)"""
    lr: float | None = None
    """AdamW learning rate; default: 3e-5, or 3e-4 with --lora-r (an adapter needs about 10x the rate of full fine-tuning: at 3e-5 a rank-8 adapter leaves the policy where it started)"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to zero over --steps (ppo-details 21)"""
    kl_coef: float = 0.1
    """KL penalty coefficient beta (initial value when --adaptive-kl)"""
    kl_estimator: KLEstimatorChoice = "auto"
    """per-token KL: k1, k2, k3 (Schulman 2020) on sampled tokens, or exact from full logits; auto: k1 in the reward, k3 in the loss"""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """put the KL penalty in the per-token reward (InstructGPT) or in the loss (GRPO-style; with k3 or k2); auto: the loss for grpo and dr_grpo, else the reward"""
    adaptive_kl: bool = False
    """adapt beta toward --target-kl (Ziegler et al. 2019)"""
    target_kl: float = 6.0
    """target KL for --adaptive-kl, nats per sequence (summed over tokens)"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in samples"""
    gamma: float = 1.0
    """discount (ppo-details 15)"""
    lam: float = 0.95
    """GAE lambda (ppo-details 15)"""
    clip_eps: float = 0.2
    """policy ratio clip range"""
    value_clip_eps: float = 0.2
    """value clip range around the rollout values (ppo-details 18)"""
    vf_coef: float = 0.1
    """value loss weight"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    whiten_rewards: bool = False
    """whiten per-token rewards before GAE (off by default, ppo-details 16)"""
    missing_eos_penalty: float | None = None
    """replace the score of responses that never emit EOS with this value (lm-human-preferences used -1); with --reward-shaping it replaces the shaped score, so give it on that scale (par: in (0, 1), e.g. 0)"""
    reward_shaping: Literal["none", "clip", "par"] = "none"
    """bound the sequence reward (the weighted sum of the reward terms) before PPO sees it: clip clamps it to [-C, C] (--reward-clip); par (Preference As Reward, Fu et al. 2025) replaces it by the mean over --par-samples reference responses of sigmoid(r - r_ref), in (0, 1) and 0.5 for a response as good as the reference's (each step then also samples and scores --par-samples reference responses per sequence)"""
    reward_clip: float = 3.0
    """C of --reward-shaping clip; the built-in reward model scores reference samples with mean 0 and std 1, so C counts those standard deviations"""
    par_samples: int = 1
    """M of --reward-shaping par: reference responses sampled for each row, each step, from the frozen reference model (the paper found one enough)"""
    micro_batch_size: int = 0
    """sequences per forward and backward pass inside a minibatch, the gradients accumulated (0: the whole minibatch); the update does not depend on it"""
    rollout_batch_size: int = 0
    """sequences per generation and scoring pass (0: the whole batch at once); bounds the rollout's memory; results do not depend on it"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them (less memory, roughly a third more compute)"""
    compile: bool = False
    """compile the policy's and the reference's forward passes with torch.compile (dynamic shapes): the first steps spend a minute or more compiling, later steps run faster (a 4-layer x 192 Llama on 2 CPU cores: a GRPO step 1.3x faster after 25-90 s); the numbers are the eager forward's up to float rounding"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype of the matrix products (autocast); the frozen matmul weights (reference, reward model, a LoRA policy's base) are stored in it, while embeddings, norms, the residual stream, the heads and every trained weight stay float32. auto: bfloat16 on a CUDA GPU that has it, else float32"""
    fp32_lm_head: bool = True
    """under bfloat16: run the LM head in float32, so log-probs, ratios and the KL come from float32 logits (the head's matmul then costs float32 time; --no-fp32-lm-head runs it in bf16)"""
    advantage_estimator: Literal["gae", "rloo", "grpo", "dr_grpo", "reinforce_pp"] = "gae"
    """gae: PPO's, with a value head; critic-free (no value head): rloo, grpo and dr_grpo (baselines from the other samples of a prompt, --samples-per-prompt 2 or more) and reinforce_pp (REINFORCE++); see docs/algorithms.md"""
    samples_per_prompt: int = 1
    """responses sampled per prompt: a step holds --batch-size x this many sequences, and --minibatch-size counts sequences"""
    loss_aggregation: Literal[
        "auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "auto"
    """how per-token losses become one number; auto: token-mean, but seq-mean-token-mean for grpo and seq-mean-token-sum-norm (over --response-tokens) for dr_grpo, as their papers do"""
    value_model: Literal["shared", "reward"] = "shared"
    """value head on the policy's trunk, or a separate value network initialised from the reward model"""
    seed: int = 0
    """seed for prompts, sampling and minibatch order"""
    shard: bool = False
    """under torchrun: shard the policy, reference, reward and value models over the processes with FSDP2, for models too big for one device (checkpoints then use torch.distributed.checkpoint)"""
    gather_for_sampling: bool = True
    """with --shard: gather the policy's full weights once for each rollout's sampling, instead of each block's at every sampled token (the memory of the full weights for a while; TRL's ds3_gather_for_generation does the same); --no-gather-for-sampling keeps them sharded"""

    def resolve(self) -> None:
        """Replace each "auto" by what it stands for with the chosen estimator, and an unset
        --lr by its default (in place)."""
        if self.lr is None:
            self.lr = PPO_LORA_LR if getattr(self, "lora_r", 0) else PPO_LR
        group_normalised = self.advantage_estimator in ("grpo", "dr_grpo")
        if self.kl_in == "auto":
            self.kl_in = "loss" if group_normalised else "reward"
        if self.kl_estimator == "auto":
            self.kl_estimator = "k3" if self.kl_in == "loss" else "k1"
        if self.loss_aggregation == "auto":
            self.loss_aggregation = {
                "grpo": "seq-mean-token-mean",
                "dr_grpo": "seq-mean-token-sum-norm",
            }.get(self.advantage_estimator, "token-mean")

    @property
    def rollout_rows(self) -> int:
        """Sequences per step: every prompt of the batch, sampled --samples-per-prompt times."""
        return self.batch_size * self.samples_per_prompt

    def validate(self) -> None:
        self.resolve()
        self.validate_rollout()
        for name in (
            "steps",
            "batch_size",
            "minibatch_size",
            "ppo_epochs",
            "response_tokens",
            "samples_per_prompt",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        self._validate_estimator()
        self._validate_shaping()
        if self.rollout_rows % self.minibatch_size:
            rows = (
                f"--batch-size {self.batch_size}"
                if self.samples_per_prompt == 1
                else f"the {self.rollout_rows} sequences of a step (--batch-size x --samples-per-prompt)"
            )
            raise ConfigError(
                f"--minibatch-size {self.minibatch_size} must divide {rows} "
                f"({_divisible_sizes(self.batch_size, self.samples_per_prompt, self.minibatch_size)})"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k != 0 or self.top_p != 1.0:
            # The sampler supports both (models.generation), but the log-probs PPO trains on are
            # those of the unfiltered softmax.
            given = f"--top-k {self.top_k}" if self.top_k != 0 else f"--top-p {self.top_p}"
            raise ConfigError(
                f"{given}: PPO samples from the full softmax (at --temperature) only; the responses "
                "would come from the filtered distribution while the ratio and the KL use the "
                "unfiltered one, so they would describe another policy"
            )
        if self.lr <= 0 or self.clip_eps <= 0 or self.value_clip_eps <= 0:
            raise ConfigError("--lr, --clip-eps and --value-clip-eps must be positive")
        if self.adaptive_kl and self.target_kl <= 0:
            raise ConfigError(f"--target-kl must be positive, got {self.target_kl}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ConfigError("--gamma and --lam must be between 0 and 1")
        if self.kl_horizon <= 0:
            raise ConfigError(f"--kl-horizon must be positive, got {self.kl_horizon}")
        for name in ("micro_batch_size", "rollout_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 0 (0: all at once), got {getattr(self, name)}"
                )
        if self.micro_batch_size > self.minibatch_size:
            raise ConfigError(
                f"--micro-batch-size {self.micro_batch_size} is larger than --minibatch-size "
                f"{self.minibatch_size}; it splits a minibatch, so it must be at most that"
            )
        for name in (
            "kl_estimator", "kl_in", "lr_schedule", "value_model", "dtype", "advantage_estimator",
            "loss_aggregation",
        ):  # fmt: skip
            choices = typing.get_args(typing.get_type_hints(PPOConfig)[name])
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        if self.kl_in == "loss" and self.kl_estimator == "exact":
            raise ConfigError(
                "--kl-estimator exact works only with --kl-in reward; use --kl-estimator k3 (or k2) "
                "for a KL loss"
            )
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            # d/dtheta of mean(log pi - log ref) on tokens drawn from pi is the score function,
            # whose expectation under pi is 0 (ppo-details 13).
            raise ConfigError(
                "--kl-in loss with --kl-estimator k1 gives no KL constraint: the k1 gradient on "
                "samples from the policy has expectation zero, so the term adds only noise; use "
                "--kl-estimator k3 (or k2)"
            )

    def _validate_shaping(self) -> None:
        choices = typing.get_args(typing.get_type_hints(PPOConfig)["reward_shaping"])
        if self.reward_shaping not in choices:
            raise ConfigError(
                f"--reward-shaping must be one of {', '.join(choices)}, got {self.reward_shaping!r}"
            )
        if not (math.isfinite(self.reward_clip) and self.reward_clip > 0):
            raise ConfigError(
                f"--reward-clip must be a positive number (the bound C of [-C, C]), got "
                f"{self.reward_clip}"
            )
        if self.par_samples <= 0:
            raise ConfigError(f"--par-samples must be positive, got {self.par_samples}")

    def _validate_estimator(self) -> None:
        if self.advantage_estimator in GROUP_ESTIMATORS:
            from ..core import check_samples_per_prompt

            check_samples_per_prompt(self.samples_per_prompt, method=self.advantage_estimator)
        if self.advantage_estimator in CRITIC_FREE and self.value_model == "reward":
            raise ConfigError(
                f"--value-model reward: --advantage-estimator {self.advantage_estimator} has no "
                "value model (it is critic-free); leave --value-model out"
            )


def _divisible_sizes(batch: int, per_prompt: int, minibatch: int) -> str:
    """Two ways out when `minibatch` does not divide `batch * per_prompt` rows: the divisor of the
    rows nearest to it (1 only when the rows are prime to everything else: a minibatch of one
    sequence is rarely meant), and the next batch size that it divides."""
    rows = batch * per_prompt
    divisors = [d for d in range(2, rows + 1) if rows % d == 0] or [1]
    nearest = min(divisors, key=lambda d: (abs(d - minibatch), d))
    bigger = next(
        b for b in range(batch + 1, batch + minibatch + 1) if b * per_prompt % minibatch == 0
    )
    return f"for example --minibatch-size {nearest}, or --batch-size {bigger}"


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

    KL is per sequence (summed over response tokens), in nats, averaged over the batch.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


@dataclass
class PPORunConfig(PPOConfig, LoraArgs, TrackingArgs):
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
    eos_token: str | None = None
    """token that ends a response, replacing the tokenizer's EOS: where sampling stops and the reward is read (a chat model whose template closes a turn with another token, such as Gemma's <end_of_turn> or Phi-3's <|end|>, needs it; give the same to train-reward, ppo and dpo)"""
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
    merge_lora: bool = False
    """with --lora-r: also write policy-merged/, the adapter folded into the weights (plain transformers loads it)"""
    prompt_field: str = "prompt"
    """name of the prompt field in a --prompts file of records (text, or a list of messages rendered with the chat template)"""
    auto_resume: bool = False
    """continue from the newest checkpoint in --out if there is one, else start afresh (for torchrun --max-restarts: a restarted run carries on by itself)"""
    task: Literal["reviews", "arithmetic"] = "reviews"
    """the built-in task behind every input not given: reviews (make film and product reviews positive; reward model trained on first use, sentiment gold judge) or arithmetic (answer sums such as 12+7=; a small model pretrained on first use, the strict verifier as the reward, strict accuracy as the gold score)"""
    reward_fn: list[str] = field(default_factory=list)
    """a reward function, FILE.py:NAME or package.module:NAME, with TRL's signature fn(prompts, completions, **columns) -> list of float or None (None: does not apply to that row); the prompt records' other fields arrive as columns; repeat for several, summed with --reward-weights. Without --reward-model no reward model is loaded"""
    reward_weights: str | None = None
    """comma-separated weights of the --reward-fn terms, in order (default: 1 each)"""
    reward_model_weight: float = 1.0
    """weight of the reward model's score in the sum, when there are other reward terms"""
    reward_url: str | None = None
    """a reward server to score through (OpenRLHF's remote reward protocol: POST {"query", "prompts", "labels"}, answered with {"rewards"}), such as `rlhf serve-reward`'s http://HOST:PORT/get_reward; one more term in the sum"""
    reward_url_weight: float = 1.0
    """weight of the reward server's score in the sum"""
    reward_label_field: str = "label"
    """the prompt records' field sent to the reward server as each row's label (a reference answer); rows without it send an empty label, as OpenRLHF does"""
    reward_timeout: float = 60.0
    """seconds to wait for the reward server's answer to one request"""
    reward_retries: int = 4
    """times a failed request to the reward server is retried (waiting 1, 2, 4, ... s) before the run checkpoints and stops"""
    reward_batch_size: int = 64
    """rows per request to the reward server"""
    reward_ensemble: Literal["auto", "mean", "min", "uwo"] = "auto"
    """how the members of an ensemble reward model (`rlhf train-reward --ensemble N`) are combined (Coste et al. 2023): mean, min (the worst case), or uwo (uncertainty-weighted: the mean minus --uncertainty-coef times the members' variance); auto: mean for an ensemble, the single model otherwise. Given without --reward-model on the built-in task, the built-in ensemble of --ensemble-members"""
    ensemble_members: int = 4
    """members of the built-in ensemble reward model that --reward-ensemble mean, min or uwo uses without --reward-model (trained on first use and cached, like the built-in single model; each member is a LoRA adapter on one shared base)"""
    uncertainty_coef: float = 0.0
    """lambda of --reward-ensemble uwo: how much the members' variance (population, over members) is subtracted from their mean"""

    @staticmethod
    def saved_options(saved: dict) -> dict:
        """A config.json of an earlier version, in today's terms (for `tracking.option_changes`).

        Before "auto" and --ensemble-members, --reward-ensemble defaulted to mean, which did what
        auto does now (mean for an ensemble, the single model otherwise, the built-in one too)."""
        if "ensemble_members" not in saved and saved.get("reward_ensemble") == "mean":
            saved = {**saved, "reward_ensemble": "auto"}
        return saved

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        self.validate_tracking()
        from ..reward.sources import parse_weights

        parse_weights(self.reward_weights, len(self.reward_fn))
        for name in ("reward_model_weight", "reward_url_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number")
        if self.reward_timeout <= 0 or self.reward_batch_size <= 0 or self.reward_retries < 0:
            raise ConfigError(
                "--reward-timeout and --reward-batch-size must be positive and --reward-retries "
                f"at least 0, got {self.reward_timeout}, {self.reward_batch_size} and "
                f"{self.reward_retries}"
            )
        if self.reward_ensemble not in ("auto", "mean", "min", "uwo"):
            raise ConfigError(
                f"--reward-ensemble must be one of auto, mean, min, uwo, got {self.reward_ensemble!r}"
            )
        if self.ensemble_members < 2:
            raise ConfigError(
                f"--ensemble-members must be at least 2 (an ensemble), got {self.ensemble_members}"
            )
        if not (math.isfinite(self.uncertainty_coef) and self.uncertainty_coef >= 0):
            raise ConfigError(
                f"--uncertainty-coef must be a finite number >= 0, got {self.uncertainty_coef}"
            )
        if self.uncertainty_coef and self.reward_ensemble != "uwo":
            raise ConfigError(
                f"--uncertainty-coef weighs the members' variance in --reward-ensemble uwo only; "
                f"with --reward-ensemble {self.reward_ensemble} leave it out"
            )
        if self.merge_lora and not self.lora_r:
            raise ConfigError("--merge-lora needs --lora-r (there is no adapter to merge)")
        if self.lora_dropout:
            raise ConfigError(
                f"--lora-dropout {self.lora_dropout}: PPO runs with dropout off (the policy that "
                "samples must be the one that is scored, so the first ratio is exactly 1); "
                "dropout applies to train-reward and dpo"
            )
        for name in ("sample_every", "max_prompt_tokens", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.save_every < 0:
            raise ConfigError(
                f"--save-every must be >= 0 (0: only on Ctrl-C), got {self.save_every}"
            )
