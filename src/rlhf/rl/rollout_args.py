"""The rollout engine's options (`--rollout-engine`, `--rollout-correction`, `--vllm-*`), apart from
`engines` so that the commands' configs (and `rlhf --help`) need not import torch or vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

ENGINES = ("hf", "vllm")
CORRECTIONS = ("auto", "none", "tis", "mask")


@dataclass
class RolloutArgs:
    """Which engine samples the rollouts, and how its mismatch with the trainer is corrected."""

    rollout_engine: Literal["hf", "vllm"] = "hf"
    """what samples the responses: hf (rlhf's own loop over the transformers model: exact, the default on a CPU) or vllm (an in-process vLLM engine next to the trainer, its weights pushed from the policy before every rollout; needs `pip install rlhf[vllm]`, pays off on a GPU)"""
    rollout_correction: Literal["auto", "none", "tis", "mask"] = "auto"
    """how the engine-trainer mismatch is corrected in the policy loss: tis (truncated importance sampling, Yao et al. 2025: each token's loss times min(p_trainer / p_engine, C)), mask (drop whole sequences whose ratio is outside [1/C, C]), none; auto: tis with vllm, none with hf (whose sampler is the trainer's own model and code)"""
    rollout_correction_cap: float = 2.0
    """C of --rollout-correction: the truncation of tis, the band [1/C, C] of mask"""
    vllm_gpu_memory_utilization: float = 0.3
    """CUDA only: the share of the GPU's memory vLLM takes for its weights and KV cache (the trainer keeps the rest)"""
    vllm_sleep_level: int = 1
    """CUDA only: during the update vLLM sleeps to give the trainer its memory back: 1 offloads its weights to CPU memory and drops its KV cache, 2 discards the weights too (re-pushed on waking), 0 stays awake"""
    vllm_kv_cache_gb: float = 1.0
    """CPU only: memory for vLLM's KV cache, in GiB (the CPU backend has no share of a device to take)"""

    def validate_rollout(self) -> None:
        if self.rollout_engine not in ENGINES:
            raise ConfigError(
                f"--rollout-engine must be one of {', '.join(ENGINES)}, got {self.rollout_engine!r}"
            )
        if self.rollout_correction not in CORRECTIONS:
            raise ConfigError(
                f"--rollout-correction must be one of {', '.join(CORRECTIONS)}, got "
                f"{self.rollout_correction!r}"
            )
        if not (math.isfinite(self.rollout_correction_cap) and self.rollout_correction_cap > 1):
            raise ConfigError(
                f"--rollout-correction-cap must be a number above 1, got "
                f"{self.rollout_correction_cap}"
            )
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(
                f"--vllm-gpu-memory-utilization must be between 0 and 1, got "
                f"{self.vllm_gpu_memory_utilization}"
            )
        if self.vllm_sleep_level not in (0, 1, 2):
            raise ConfigError(f"--vllm-sleep-level must be 0, 1 or 2, got {self.vllm_sleep_level}")
        if not self.vllm_kv_cache_gb > 0:
            raise ConfigError(f"--vllm-kv-cache-gb must be positive, got {self.vllm_kv_cache_gb}")

    @property
    def correction(self) -> str:
        """--rollout-correction with auto resolved."""
        if self.rollout_correction != "auto":
            return self.rollout_correction
        return "tis" if self.rollout_engine == "vllm" else "none"
