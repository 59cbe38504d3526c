"""`SFTConfig`, the options of `rlhf sft`, apart from the training code so that the command line
can read them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..models.lora_args import LoraArgs
from ..trackers import TrackingArgs

FULL_LR = 2e-5
"""TRL's SFTConfig default for full fine-tuning"""
LORA_LR = 2e-4
"""ten times the full fine-tuning rate: the LoRA optimum sits about 10x above full fine-tuning's
(Schulman et al., "LoRA Without Regret", Thinking Machines 2025); TRL's LoRA examples use 2e-4"""


@dataclass
class SFTConfig(LoraArgs, TrackingArgs):
    """Options of `rlhf sft`."""

    out: str = "runs/sft"
    """output folder: model/ (what train-reward, ppo and dpo take as --model), config.json, metrics.jsonl, sft_eval.json, samples.jsonl; adapter/ too with --lora-r"""
    data: str | None = None
    """examples to imitate (required): {"text"}, {"prompt", "completion"} or {"messages"} records, or prompt and completion as lists of messages (TRL's forms), in JSONL, JSON, Parquet or a `datasets` folder"""
    model: str | None = None
    """Hugging Face folder of the base model; default: the built-in base model"""
    text_field: str = "text"
    """name of the field that holds a whole text (language-modelling records)"""
    prompt_field: str = "prompt"
    """name of the prompt field (prompt-completion records)"""
    completion_field: str = "completion"
    """name of the completion field (prompt-completion records)"""
    messages_field: str = "messages"
    """name of the conversation field (conversational records)"""
    completion_only_loss: bool = True
    """the loss is on the completion's tokens, or on the assistant's turns of a conversation, not on the prompt's; --no-completion-only-loss trains on every token (a text record always does)"""
    lr: float | None = None
    """AdamW learning rate (linear decay to zero); default: 2e-5 with the whole model trained (TRL's default), 2e-4 for a LoRA adapter (about 10x, as LoRA's optimum sits)"""
    epochs: int = 3
    """passes over the training examples"""
    batch_size: int = 8
    """examples per optimizer step; the loss is the mean over the step's trained tokens"""
    micro_batch_size: int = 0
    """examples per forward/backward pass (gradients accumulate to --batch-size; 0: the whole batch); the update is the same whatever it is"""
    max_length: int | None = None
    """longest tokenised example; longer ones keep their start (TRL's rule); default: 1024, or the model's position limit if lower"""
    eval_fraction: float = 0.1
    """share of examples held out for the held-out loss (at least one)"""
    sample_prompts: int = 8
    """held-out prompts to sample completions for after training, into samples.jsonl (0: none; prompt forms only)"""
    sample_tokens: int = 48
    """longest sampled completion in samples.jsonl, in tokens"""
    seed: int = 0
    """seed for the split, the batch order and the samples"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """where the built-in base model is cached"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""
    chat_template: bool = False
    """wrap each text prompt in the tokenizer's chat template as a user turn (give the same option to train-reward, ppo and dpo); conversations are always rendered with the template"""
    eos_token: str | None = None
    """token that ends a response, replacing the tokenizer's EOS: it is appended to text completions and saved with the tokenizer, so later stages stop there too"""

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.lora_r else FULL_LR)

    def validate(self) -> None:
        self.validate_lora()
        self.validate_tracking()
        if not self.data:
            raise ConfigError(
                "rlhf sft needs --data FILE, the examples to imitate (docs/examples/"
                "sft-reviews.jsonl is a small one for the built-in model)"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        problems = [
            (self.lr is not None and not self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (not 0 < self.eval_fraction < 1, f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}"),
            (self.micro_batch_size < 0, f"--micro-batch-size must be >= 0 (0: the whole batch), got {self.micro_batch_size}"),
            (self.max_length is not None and self.max_length < 2, f"--max-length must be at least 2, got {self.max_length}"),
            (self.sample_prompts < 0, f"--sample-prompts must be >= 0, got {self.sample_prompts}"),
            (self.sample_tokens <= 0, f"--sample-tokens must be positive, got {self.sample_tokens}"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        names = [self.text_field, self.prompt_field, self.completion_field, self.messages_field]
        if len(set(names)) < 4:
            raise ConfigError(
                "--text-field, --prompt-field, --completion-field and --messages-field must "
                f"name four different fields, got {', '.join(names)}"
            )
