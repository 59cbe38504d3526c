"""PPO against a reward model with a KL penalty to a frozen reference (the seed's task 3).

Shapes: B rollout batch, M minibatch, P prompt tokens (left-padded), R response tokens
(right-padded after EOS), V vocabulary.

One PPO step is a row of named phases:
    rollout -> forward passes (policy, value, reference) -> score -> kl_penalised_rewards
    -> gae -> whiten -> ppo_epochs
Item numbers in comments refer to ../shared/reference/ppo-details.md (in the repository's docs).
`PPOConfig` and the KL controllers live in `config`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import (
    compute_gae,
    compute_kl_penalty,
    entropy_from_logprobs,
    explained_variance,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_mask_from_eos,
    value_loss,
)
from ..errors import ConfigError, RLHFError
from ..models.forward import (
    accepts_kwarg,
    device_of,
    position_ids_from_mask,
    swap_slow_gelu,
)
from ..models.generation import decode_responses, encode_prompts, sample_responses
from ..models.policy import PolicyWithValueHead, ValueModel
from ..models.reward_model import RewardModel
from .config import AdaptiveKLController, FixedKLController, PPOConfig


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO computes from it (all detached)."""

    query_response: torch.Tensor  # (B, P+R) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt tokens and response tokens up to EOS
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward-model score (after any missing-EOS penalty)
    kl: torch.Tensor  # (B, R) per-token KL estimate, 0 after EOS
    rewards: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R)
    prompts: list[str]
    texts: list[str]
    ended: list[bool]
    timings: dict[str, float] = field(default_factory=dict)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()  # dropout off (ppo-details 2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PPOTrainer:
    """Holds the models, the optimizer, the KL controller and the config; `step(prompts)` runs PPO.

    `policy` is a Hugging Face causal LM (wrapped with a zero-initialised value head) or a
    `PolicyWithValueHead`; `ref_model` is the frozen reference (the SFT model); `reward_model` is a
    `RewardModel`. `reward_tokenizer` is needed only when it differs from `tokenizer`.
    """

    def __init__(
        self,
        policy: nn.Module,
        ref_model: nn.Module,
        reward_model: RewardModel,
        tokenizer,
        config: PPOConfig | None = None,
        reward_tokenizer=None,
        gold_judge=None,
    ):
        self.config = config or PPOConfig()
        self.config.validate()
        cfg = self.config
        lm = policy.lm if isinstance(policy, PolicyWithValueHead) else policy
        if ref_model is lm or getattr(reward_model, "base_model", None) is lm:
            raise ConfigError(
                "the reference and reward models must be separate copies of the policy "
                "(for example copy.deepcopy(policy)); they are frozen, the policy is trained"
            )
        self.policy = (
            policy if isinstance(policy, PolicyWithValueHead) else PolicyWithValueHead(policy)
        )
        self.policy.eval()  # dropout off in the policy too; eval() does not stop gradients
        self.device = device_of(self.policy)
        self.ref_model = _freeze(ref_model)
        self.reward_model = _freeze(reward_model)
        self.tokenizer = tokenizer
        self.reward_tokenizer = (
            reward_tokenizer or getattr(reward_model, "tokenizer", None) or tokenizer
        )
        self.same_tokenizer = self.reward_tokenizer is tokenizer or (
            self.reward_tokenizer.get_vocab() == tokenizer.get_vocab()
        )
        self.gold_judge = gold_judge
        self.value_model = (
            ValueModel(reward_model).to(self.device) if cfg.value_model == "reward" else None
        )
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_model is not None:
            params += list(self.value_model.parameters())
        self.params = params
        for model in (self.policy, self.ref_model, self.reward_model, self.value_model):
            if model is not None:
                swap_slow_gelu(model)
        # eps 1e-5 as in lm-human-preferences' Adam. The fused kernel updates every tensor in one
        # pass (the default of transformers' Trainer too); it needs floating-point CPU/CUDA params.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, eps=1e-5, weight_decay=0.0, fused=fused or None
        )
        total = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
        decay = (
            (lambda s: max(0.0, 1.0 - s / total))
            if cfg.lr_schedule == "linear"
            else (lambda s: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.cpu_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step_count = 0

    # ----- forward passes ------------------------------------------------------------------
    def _autocast(self):
        from ..models.forward import autocast

        return autocast(self.device)

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits divided by the sampling temperature (ppo-details 1)."""
        logits = logits.float()
        t = self.config.temperature
        return logits if t == 1.0 else logits / t

    def _policy_forward(self, ids, mask, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature-scaled logits (B, R, V) over the response positions and values (B, R)."""
        R = ids.shape[1] - P
        with self._autocast():
            # The LM head runs on the last R+1 positions only; the prompt needs no logits.
            logits, values = self.policy(ids, mask, logits_to_keep=R + 1)  # (B, R+1, V), (B, P+R)
            if self.value_model is not None:
                values = self.value_model(ids, mask)  # (B, P+R)
        # The logits at position P-1+t predict response token t; the value there is V(s_t).
        return self._scaled(logits[:, :-1]), values[:, P - 1 : -1].float()  # (B, R, V), (B, R)

    @torch.no_grad()
    def _ref_logits(self, ids, mask, P: int) -> torch.Tensor:
        R = ids.shape[1] - P
        kwargs = (
            {"logits_to_keep": R + 1} if accepts_kwarg(self.ref_model, "logits_to_keep") else {}
        )
        with self._autocast():
            logits = self.ref_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                **kwargs,
            ).logits  # (B, R+1, V), or (B, P+R, V) without logits_to_keep
        return self._scaled(logits[:, -(R + 1) : -1])  # (B, R, V)

    @torch.no_grad()
    def _score(
        self, prompts, texts, query_response, attention_mask, lengths, ended, P: int
    ) -> torch.Tensor:
        """Reward-model score of each sequence, read at its EOS (ppo-details 7, 10)."""
        if not self.same_tokenizer:
            from ..reward.loss import score_texts

            return score_texts(self.reward_model, self.reward_tokenizer, prompts, texts).to(
                self.device
            )
        from ..models.reward_model import score_responses

        # Rows that never emitted EOS get one appended (see score_responses); train_reward fits
        # the reward's normalisation with the same function.
        with self._autocast():
            return score_responses(
                self.reward_model, query_response[:, :P], attention_mask[:, :P],
                query_response[:, P:], self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
            )  # fmt: skip

    # ----- phases 1-6: rollout to advantages --------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Rollout:
        cfg, tok = self.config, self.tokenizer
        timings = {}
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, _ = encode_prompts(tok, prompts, device=self.device)  # (B, P)
        P = prompt_ids.shape[1]
        with self._autocast():
            response = sample_responses(
                self.policy.lm, prompt_ids, prompt_mask, cfg.response_tokens, tok.eos_token_id,
                tok.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, self.generator,
            )  # fmt: skip
        R = response.shape[1]
        response_mask = response_mask_from_eos(response, tok.eos_token_id)  # (B, R)
        lengths = response_mask.sum(1).long()  # (B,)
        ended = (response == tok.eos_token_id).any(1)  # (B,)
        query_response = torch.cat([prompt_ids, response], 1)  # (B, P+R)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)  # (B, P+R)
        texts, ended_list = decode_responses(tok, response, tok.eos_token_id)
        timings["time/generate_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits, values = self._policy_forward(
            query_response, attention_mask, P
        )  # (B, R, V), (B, R)
        logprobs = logprobs_from_logits(logits, response)  # (B, R)
        ref_logits = self._ref_logits(query_response, attention_mask, P)  # (B, R, V)
        ref_logprobs = logprobs_from_logits(ref_logits, response)  # (B, R)
        timings["time/forward_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = self._score(
            prompts, texts, query_response, attention_mask, lengths, ended, P
        )  # (B,)
        if cfg.missing_eos_penalty is not None:  # ppo-details 6
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        timings["time/score_s"] = time.perf_counter() - t0

        # Per-token KL penalty and the score at the last response token (ppo-details 10, 11).
        if cfg.kl_estimator == "exact":
            kl = compute_kl_penalty(logits, ref_logits, response_mask)  # (B, R)
        else:
            kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)  # (B, R)
            kl = torch.where(response_mask.bool(), kl, torch.zeros_like(kl))  # (B, R), 0 after EOS
        beta = self.kl_ctl.value
        rewards = -beta * kl if cfg.kl_in == "reward" else torch.zeros_like(kl)  # (B, R)
        rewards[torch.arange(len(prompts), device=self.device), lengths - 1] += scores
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False)
        values = values * response_mask  # (B, R)
        advantages, returns = compute_gae(
            rewards, values, response_mask, cfg.gamma, cfg.lam
        )  # (B, R) x2
        advantages = masked_whiten(advantages, response_mask)  # (B, R), ppo-details 16
        del R
        return Rollout(
            query_response, attention_mask, response_mask, logprobs, ref_logprobs, values, scores, kl,
            rewards, advantages, returns, list(prompts), texts, ended_list, timings,
        )  # fmt: skip

    # ----- phase 7: PPO epochs over minibatches -------------------------------------------
    def update(self, b: Rollout) -> dict[str, float]:
        cfg = self.config
        B = b.query_response.shape[0]
        P = b.query_response.shape[1] - b.response_mask.shape[1]
        response = b.query_response[:, P:]  # (B, R)
        totals: dict[str, float] = {}
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.cpu_generator).to(self.device)  # (B,)
            for start in range(0, B, cfg.minibatch_size):
                mb = order[start : start + cfg.minibatch_size]  # (M,)
                mb_mask = b.response_mask[mb]  # (M, R)
                logits, mb_values = self._policy_forward(
                    b.query_response[mb], b.attention_mask[mb], P
                )
                logp_all = torch.log_softmax(logits, dim=-1)  # (M, R, V), float32
                mb_logprobs = logp_all.gather(-1, response[mb].unsqueeze(-1)).squeeze(-1)  # (M, R)
                pg_loss, pg_stats = policy_loss(
                    mb_logprobs, b.logprobs[mb], b.advantages[mb], mb_mask, cfg.clip_eps
                )
                vf_loss, vf_stats = value_loss(
                    mb_values, b.values[mb], b.returns[mb], mb_mask, cfg.value_clip_eps
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                if cfg.kl_in == "loss":  # ppo-details 13
                    # Masked positions take the policy's own log-prob (KL 0) so garbage there cannot
                    # overflow into a nan gradient.
                    mb_ref = torch.where(
                        mb_mask.bool(), b.ref_logprobs[mb], mb_logprobs.detach()
                    )  # (M, R)
                    kl_term = masked_mean(
                        kl_estimate(mb_logprobs, mb_ref, cfg.kl_estimator), mb_mask
                    )
                    loss = loss + self.kl_ctl.value * kl_term
                self._check_finite(loss, "loss")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self._check_finite(grad_norm, "gradient norm")
                self.optimizer.step()
                self.scheduler.step()
                with torch.no_grad():
                    stats = {
                        "loss/policy": pg_loss.item(),
                        "loss/value": vf_loss.item(),
                        "policy/approxkl": pg_stats["approxkl"].item(),
                        "policy/clipfrac": pg_stats["clipfrac"].item(),
                        "policy/ratio": pg_stats["ratio"].item(),
                        "policy/entropy": masked_mean(
                            entropy_from_logprobs(logp_all), mb_mask
                        ).item(),
                        "val/clipfrac": vf_stats["vf_clipfrac"].item(),
                        "policy/grad_norm": grad_norm.item(),
                    }
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                if n_updates == 0:
                    totals["policy/first_ratio"] = pg_stats["ratio"].item()
                n_updates += 1
        return {k: (v if k == "policy/first_ratio" else v / n_updates) for k, v in totals.items()}

    def _check_finite(self, value: torch.Tensor, name: str) -> None:
        if not torch.isfinite(value).all():
            raise NonFiniteError(
                f"step {self.step_count + 1}: the {name} is not finite; no weights were changed by this "
                "minibatch (try a lower --lr, or check the reward model's scores)"
            )

    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO step on these prompts; returns the step's metrics."""
        from ..text_stats import distinct_n, mean_repetition

        start = time.perf_counter()
        beta = self.kl_ctl.value
        b = self.rollout(prompts)
        if not torch.isfinite(b.scores).all():
            raise NonFiniteError(
                f"step {self.step_count + 1}: the reward model returned a non-finite score"
            )
        t0 = time.perf_counter()
        stats = self.update(b)
        stats["time/update_s"] = time.perf_counter() - t0
        with torch.no_grad():
            kl_k1 = ((b.logprobs - b.ref_logprobs) * b.response_mask).sum(
                1
            )  # (B,) nats per sequence
            kl_seq = kl_k1.mean().item()
            reward = b.scores.mean().item()
            metrics = {
                "objective/reward": reward,
                "objective/kl": kl_seq,
                "objective/kl_penalty": (b.kl.sum(1)).mean().item(),
                "objective/combined": reward - beta * kl_seq,
                "objective/kl_coef": beta,
                "objective/score_std": b.scores.std().item() if len(prompts) > 1 else 0.0,
                "val/explained_variance": explained_variance(
                    b.values, b.returns, b.response_mask
                ).item(),
                "val/mean": masked_mean(b.values, b.response_mask).item(),
                "text/response_tokens": b.response_mask.sum(1).mean().item(),
                "text/eos_rate": sum(b.ended) / len(b.ended),
                "text/distinct_2": distinct_n(b.texts, 2),
                "text/repetition": mean_repetition(b.texts, 1),
                "lr": self.scheduler.get_last_lr()[0],
            }
        if self.gold_judge is not None:
            gold = self.gold_judge.score_batch(b.prompts, b.texts, b.ended)
            metrics["objective/gold"] = sum(gold) / len(gold)
            self.last_gold = gold
        self.kl_ctl.update(kl_seq, len(prompts))
        self.step_count += 1
        metrics.update(stats)
        metrics.update(b.timings)
        metrics["time/step_s"] = time.perf_counter() - start
        self.last_rollout = b
        return metrics


class NonFiniteError(RLHFError):
    """A loss, reward or gradient became NaN or infinite."""
