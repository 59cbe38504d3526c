"""Rollout engines: what samples the responses of a PPO step (`--rollout-engine`).

Shapes: B rows, P prompt tokens (left-padded), R response tokens (right-padded after EOS).

An engine is the small interface the trainer calls, and nothing else of it:
    sync()       before each rollout: make the engine sample from the policy's current weights
    sample(...)  prompts and each row's random draws in, `Samples` out (responses, log-probs)
    release()    after the rollout: give the memory the update needs back (vLLM's sleep mode)

`HFEngine` is rlhf's own sampling loop over the policy (`models.generation.sample_responses`): the
trainer's model and code, so its log-probs equal the trainer's up to rounding. `VLLMEngine`
(`vllm_engine`) is an in-process vLLM engine. Either way the trainer recomputes the old log-probs
itself; the engine's serve to measure the mismatch and correct it (`core.correction`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.generation import sample_responses


@dataclass
class Samples:
    response: torch.Tensor  # (B, R) token ids, pad after each row's first EOS
    logprobs: torch.Tensor  # (B, R) the engine's log-prob of each sampled token, 0 after EOS


class HFEngine:
    """rlhf's sampling loop over the policy itself: nothing to sync, nothing to release."""

    name = "hf"

    def __init__(
        self,
        lm: nn.Module,
        config,
        eos_token_id: int,
        pad_token_id: int,
        context: Callable[[], contextlib.AbstractContextManager],
        all_done: Callable[[bool], bool] | None = None,
    ):
        self.lm, self.config = lm, config
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.context, self.all_done = context, all_done

    def sync(self) -> None:
        pass

    def release(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    @torch.no_grad()
    def sample(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor
    ) -> Samples:
        """`uniforms` (B, R): each row's draws, one per position (`sample_responses`)."""
        cfg = self.config
        with self.context():
            response, logprobs = sample_responses(
                self.lm, prompt_ids, prompt_mask, cfg.response_tokens, self.eos_token_id,
                self.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, uniforms=uniforms,
                all_done=self.all_done, return_logprobs=True,
            )  # fmt: skip
        return Samples(response, logprobs)


def row_seeds(uniforms: torch.Tensor) -> list[int]:
    """One integer seed per row (B,) from its draws (B, R): a row's seed, like its draws, depends
    only on the run's seed, the step and the row's global index, not on chunks or processes."""
    return (uniforms[:, 0].double().cpu() * 2.0**53).long().tolist()
