"""The LoRA options, apart from `lora` so that the commands' configs (and `rlhf --help`) need not
import torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class LoraArgs:
    """LoRA options shared by `rlhf ppo`, `rlhf train-reward` and `rlhf dpo`."""

    lora_r: int = 0
    """LoRA rank: train rank-r adapters on the frozen model instead of every weight (0: off, full fine-tuning); 8-64 is usual"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is multiplied by alpha / r"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input while training (train-reward, dpo; PPO refuses it: it runs with dropout off, ppo-details 2)"""
    lora_target_modules: str = "all-linear"
    """comma-separated names of the layers that get adapters (e.g. q_proj,v_proj or c_attn), or all-linear: every linear layer but the output head"""

    def validate_lora(self) -> None:
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.lora_r and self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not self.lora_target_modules.strip(" ,"):
            raise ConfigError("--lora-target-modules is empty; give layer names or all-linear")
