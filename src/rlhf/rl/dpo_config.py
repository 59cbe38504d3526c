"""`DPOConfig`, the options of `rlhf dpo`, apart from the training code so that the command line
can read them without importing torch."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..models.lora_args import LoraArgs
from ..reward.config import check_preference_fields
from ..trackers import TrackingArgs


@dataclass
class DPOConfig(LoraArgs, TrackingArgs):
    """Options of `rlhf dpo`."""

    out: str = "runs/dpo"
    """output folder: policy/, config.json, metrics.jsonl, dpo_eval.json, samples.jsonl"""
    data: str | None = None
    """preference data, in the forms and formats train-reward reads (JSONL, JSON, Parquet, a `datasets` folder; text or conversations); default: generated from the built-in task as `rlhf train-reward` makes them (margins are ignored)"""
    prompt_field: str = "prompt"
    """name of the prompt field in --data (absent: the prompt is what chosen and rejected share)"""
    chosen_field: str = "chosen"
    """name of the chosen-response field in --data"""
    rejected_field: str = "rejected"
    """name of the rejected-response field in --data"""
    model: str | None = None
    """Hugging Face folder of the policy to start from (the SFT model); default: the built-in base model"""
    ref_model: str | None = None
    """frozen reference model folder; default: the same weights as --model"""
    beta: float = 0.1
    """strength of the KL constraint (DPO's beta; IPO's tau)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO) or ipo (squared loss on per-token log-ratios, as TRL)"""
    label_smoothing: float = 0.0
    """assumed rate of flipped labels for the sigmoid loss (conservative DPO); 0: off"""
    lr: float = 1e-4
    """AdamW learning rate (linear decay to zero); 1e-4 gave the best gold score on the built-in task with the whole model trained; a LoRA adapter needs more (3e-3 there)"""
    epochs: int = 1
    """passes over the training pairs"""
    batch_size: int = 32
    """pairs per optimizer step"""
    max_length: int = 256
    """longest tokenised prompt + response; longer ones are cut from the left (the prompt first)"""
    eval_fraction: float = 0.1
    """share of pairs held out for the implicit-reward accuracy"""
    n_pairs: int = 6000
    """pairs to generate for the built-in task (as `rlhf train-reward`)"""
    label_temperature: float = 0.05
    """Bradley-Terry temperature of the simulated labeller for generated pairs"""
    response_tokens: int = 40
    """longest sampled response when generating pairs, in tokens"""
    gold: bool | None = None
    """sample fresh prompts and score the responses with the gold judge (default: on for the built-in task)"""
    eval_samples: int = 256
    """prompts sampled for the gold score and the KL to the reference"""
    eval_split: Literal["eval", "train"] = "eval"
    """where those prompts come from: the built-in task's held-out openings, or its training ones (what PPO's rollouts are scored on; `rlhf sweep` uses these so every method is measured on the same prompts)"""
    eval_response_tokens: int = 24
    """longest sampled response for the gold/KL evaluation (PPO's default, for the same frontier)"""
    sample_prompts: int = 8
    """held-out prompts whose responses, from the trained policy and from the reference, go to samples.jsonl (0: none)"""
    sample_tokens: int = 48
    """longest response in samples.jsonl, in tokens"""
    seed: int = 0
    """seed for generation, splitting, batches and evaluation samples"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """where the built-in base model is cached"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""
    chat_template: bool = False
    """wrap each text prompt in the tokenizer's chat template as a user turn (as train-reward and ppo do with it); conversational data is always rendered with the template"""
    compile: bool = False
    """compile the policy's forward pass with torch.compile (dynamic shapes): the first steps spend a minute or more compiling, later steps run faster; the numbers are the eager forward's up to float rounding"""
    merge_lora: bool = False
    """with --lora-r: also write policy-merged/, the adapter folded into the weights (plain transformers loads it)"""
    eos_token: str | None = None
    """token that ends a response, replacing the tokenizer's EOS: where sampling stops and the reward is read (a chat model whose template closes a turn with another token, such as Gemma's <end_of_turn> or Phi-3's <|end|>, needs it; give the same to train-reward, ppo and dpo)"""

    def validate(self) -> None:
        self.validate_lora()
        self.validate_tracking()
        check_preference_fields(self.prompt_field, self.chosen_field, self.rejected_field)
        if self.merge_lora and not self.lora_r:
            raise ConfigError("--merge-lora needs --lora-r (there is no adapter to merge)")
        for name in ("epochs", "batch_size", "max_length", "n_pairs", "response_tokens",
                     "eval_response_tokens", "sample_tokens"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        loss_types = typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"])
        problems = [
            (self.eval_samples < 0, f"--eval-samples must be >= 0 (0: no gold/KL samples), got {self.eval_samples}"),
            (self.sample_prompts < 0, f"--sample-prompts must be >= 0 (0: no samples.jsonl), got {self.sample_prompts}"),
            (not (self.beta > 0 and math.isfinite(self.beta)), f"--beta must be a positive number, got {self.beta}"),
            (not self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (not 0 < self.eval_fraction < 1, f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}"),
            (self.label_temperature < 0, f"--label-temperature must be >= 0, got {self.label_temperature}"),
            (self.loss_type not in loss_types, f"--loss-type must be one of {', '.join(loss_types)}, got {self.loss_type!r}"),
            (self.eval_split not in ("eval", "train"), f"--eval-split must be eval or train, got {self.eval_split!r}"),
            (not 0 <= self.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (self.label_smoothing != 0 and self.loss_type != "sigmoid", "--label-smoothing applies to --loss-type sigmoid only"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
