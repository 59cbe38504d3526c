"""`RewardConfig`, the options of `rlhf train-reward` (apart from the training, so that the CLI
can build its parser without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..models.lora_args import LoraArgs
from ..trackers import TrackingArgs


@dataclass
class RewardConfig(LoraArgs, TrackingArgs):
    """Options of `rlhf train-reward`."""

    out: str = "runs/reward"
    """output folder: reward model, config.json, metrics.jsonl, reward_eval.json"""
    data: str | None = None
    """preference data: .jsonl, .json, .parquet or a datasets save_to_disk folder; records {prompt, chosen, rejected} as text or as message lists (rendered with the chat template), {chosen, rejected} (implicit prompt) or {prompt, response_A, response_B, preference}; default: generated from the built-in task"""
    prompt_field: str = "prompt"
    """name of the prompt field in --data (absent: the prompt is what chosen and rejected share)"""
    chosen_field: str = "chosen"
    """name of the chosen-response field in --data"""
    rejected_field: str = "rejected"
    """name of the rejected-response field in --data"""
    model: str | None = None
    """Hugging Face model folder to start the reward model from; default: the built-in base model"""
    n_pairs: int = 6000
    """pairs to generate for the built-in task"""
    label_temperature: float = 0.05
    """Bradley-Terry temperature of the simulated labeller (0: always pick the higher gold score)"""
    response_tokens: int = 40
    """longest sampled response when generating pairs, in tokens"""
    eval_fraction: float = 0.1
    """share of pairs held out for evaluation"""
    epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 64
    """pairs per optimizer step"""
    lr: float = 1e-3
    """AdamW learning rate (linear decay to zero)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    freeze_base: bool = False
    """train only the scalar head (fast, but a small LM's last hidden state barely encodes sentiment)"""
    max_length: int | None = None
    """longest tokenised prompt + response; longer ones are truncated from the left with a warning (default: 256, or the model's position limit if lower)"""
    normalise_samples: int = 512
    """base-model samples used to set the reward's gain and bias (mean 0, std 1); 0 turns it off"""
    normalise_response_tokens: int = 24
    """length of those samples, in tokens: the --response-tokens of `rlhf ppo` that will use the model"""
    seed: int = 0
    """seed for sampling, splitting, initialisation and batches"""
    device: str = "auto"
    """auto, cpu or cuda"""
    cache_dir: str | None = None
    """where the built-in base model is cached (default $RLHF_CACHE_DIR, $XDG_CACHE_HOME/rlhf or ~/.cache/rlhf)"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""
    chat_template: bool = False
    """wrap each text prompt in the tokenizer's chat template as a user turn (use the same with `rlhf ppo`); conversational data is always rendered with the template"""
    eos_token: str | None = None
    """token that ends a response, replacing the tokenizer's EOS: where sampling stops and the reward is read (a chat model whose template closes a turn with another token, such as Gemma's <end_of_turn> or Phi-3's <|end|>, needs it; give the same to train-reward, ppo and dpo)"""
    ensemble: int = 1
    """train N reward models as one ensemble for `rlhf ppo --reward-ensemble`: N LoRA adapters, each with its own head and normalisation, on one shared frozen base; member k draws its adapter, its head and its batch order from --seed + k. Without --lora-r the members use rank 8"""
    ensemble_bootstrap: bool = False
    """with --ensemble: train each member on its own bootstrap resample of the training pairs (drawn with replacement, from its seed)"""

    def validate(self) -> None:
        self.validate_lora()
        self.validate_tracking()
        if self.lora_r and self.freeze_base:
            raise ConfigError(
                "--lora-r trains adapters on the base; it cannot go with --freeze-base"
            )
        if self.ensemble < 1:
            raise ConfigError(f"--ensemble must be at least 1, got {self.ensemble}")
        if self.ensemble > 1 and self.freeze_base:
            raise ConfigError(
                "--ensemble trains a LoRA adapter per member on the base; it cannot go with "
                "--freeze-base"
            )
        if self.ensemble_bootstrap and self.ensemble == 1:
            raise ConfigError("--ensemble-bootstrap needs --ensemble 2 or more")
        for name in (
            "n_pairs",
            "response_tokens",
            "epochs",
            "batch_size",
            "normalise_response_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.label_temperature < 0:
            raise ConfigError(f"--label-temperature must be >= 0, got {self.label_temperature}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"--max-length must be positive, got {self.max_length}")
        if self.normalise_samples < 0:
            raise ConfigError(f"--normalise-samples must be >= 0, got {self.normalise_samples}")
        check_preference_fields(self.prompt_field, self.chosen_field, self.rejected_field)


def check_preference_fields(*names: str) -> None:
    """--prompt-field, --chosen-field and --rejected-field: three different, non-empty names."""
    if not all(names) or len(set(names)) < 3:
        raise ConfigError(
            "--prompt-field, --chosen-field and --rejected-field must be three different "
            f"names, got {', '.join(map(repr, names))}"
        )
