"""`GenerateConfig` and `EvalConfig`, the options of `rlhf generate` and `rlhf eval`, apart from
the sampling code so that the command line can read them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class SamplingArgs:
    """What `rlhf generate` and `rlhf eval` share: the policy, the prompts and how to sample."""

    policy: str | None = None
    """the policy: a run folder (`rlhf ppo`, `dpo` or `sft` --out), a Hugging Face model folder, a LoRA adapter folder or a merged model (policy-merged/)"""
    prompts: str | None = None
    """prompt file (.jsonl, .json, .parquet or a `datasets` folder with a "prompt" field, or plain text, one per line); default: the built-in task's held-out review openings, when the policy was trained on it"""
    prompt_field: str = "prompt"
    """name of the prompt field in a --prompts file of records (text, or a list of messages rendered with the chat template)"""
    num_prompts: int | None = None
    """how many prompts: the first N of --prompts (default: all of them), or N drawn from the built-in task's held-out openings"""
    response_tokens: int | None = None
    """longest response, in tokens; default: the length the run sampled with (rlhf ppo's --response-tokens), else 48"""
    temperature: float = 1.0
    """sampling temperature (1: the policy's own distribution, what PPO trained and the KL describes)"""
    seed: int = 0
    """seed of the draws: the same seed gives the same responses, whatever --batch-size"""
    batch_size: int = 64
    """prompts sampled at once (memory, not results: each row has its own random draws)"""
    max_prompt_tokens: int = 128
    """prompts longer than this keep their last tokens (with one warning)"""
    chat_template: bool | None = None
    """wrap each text prompt in the tokenizer's chat template as a user turn; default: as the run was trained (its config.json), else off; conversations are always rendered with the template"""
    eos_token: str | None = None
    """token that ends a response, replacing the saved tokenizer's EOS (which already holds a run's --eos-token)"""
    base_model: str | None = None
    """base model folder a LoRA adapter goes on; default: the one its adapter_config.json names, else the run's --model (or the built-in base model)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """cache of the built-in base and reward models; default: the run's"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""

    def validate_sampling(self) -> None:
        if not self.policy:
            raise ConfigError(
                "give the policy to sample: a run folder (such as runs/ppo), a Hugging Face model "
                "folder or a LoRA adapter folder"
            )
        problems = [
            (self.num_prompts is not None and self.num_prompts <= 0, f"--num-prompts must be positive, got {self.num_prompts}"),
            (self.response_tokens is not None and self.response_tokens <= 0, f"--response-tokens must be positive, got {self.response_tokens}"),
            (not (self.temperature > 0 and math.isfinite(self.temperature)), f"--temperature must be a positive number, got {self.temperature} (for near-greedy output use a small one, such as 0.01)"),
            (self.batch_size <= 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.max_prompt_tokens <= 0, f"--max-prompt-tokens must be positive, got {self.max_prompt_tokens}"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class GenerateConfig(SamplingArgs):
    """Options of `rlhf generate`."""

    prompt: list[str] = field(default_factory=list)
    """a prompt given on the command line; repeat it for several (instead of --prompts)"""
    num_samples: int = 1
    """responses sampled per prompt"""
    top_k: int = 0
    """sample from the k most likely tokens only (0: all of them)"""
    top_p: float = 1.0
    """nucleus sampling: the smallest set of tokens whose probability reaches p (1: all of them)"""
    out: str | None = None
    """JSONL file of {prompt, response, ended, ...} rows; default: generations.jsonl in the run folder, or in the current folder for a model folder"""
    show: int = 4
    """responses printed to the terminal (0: none)"""

    def validate(self) -> None:
        self.validate_sampling()
        if self.prompt and self.prompts:
            raise ConfigError("give prompts with --prompt TEXT or --prompts FILE, not both")
        problems = [
            (self.num_samples <= 0, f"--num-samples must be positive, got {self.num_samples}"),
            (self.top_k < 0, f"--top-k must be >= 0 (0: off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"--top-p must be in (0, 1] (1: off), got {self.top_p}"),
            (self.show < 0, f"--show must be >= 0, got {self.show}"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class EvalConfig(SamplingArgs):
    """Options of `rlhf eval`."""

    baseline: str | None = None
    """what the policy is compared with, a folder of the same kinds as the policy; default: its reference (the model the run started from)"""
    ref_model: str | None = None
    """reference for the KL: default: the run's (--ref-model, else the model it started from), or the base of a LoRA adapter"""
    reward_model: str | None = None
    """reward model folder (`rlhf train-reward --out`) for the win rate and mean reward; default: the run's, or the built-in task's; without one, the metrics that need none"""
    gold: bool | None = None
    """score responses with the built-in gold judge (default: on when the policy was trained on the built-in task)"""
    out: str | None = None
    """output folder: eval.json (the numbers, per-prompt scores and the resolved config) and eval.png; default: eval/ in the run folder, else eval-<folder name> in the current folder"""

    def validate(self) -> None:
        self.validate_sampling()
