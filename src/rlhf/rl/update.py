"""Phase 5 of a PPO step: epochs of minibatches over the gathered rollout, each minibatch in
micro-batches, every token's loss weighted by the whole minibatch's token count.

Shapes: B rollout batch (global), M minibatch, m micro-batch, R response tokens, V vocabulary.

`PPOUpdate` is the half of `PPOTrainer` (trainer.py) that updates the weights; it reads the
trainer's config, world, models, optimizer and KL controller.
"""

from __future__ import annotations

import torch

from ..core import (
    entropy_from_logprobs,
    kl_estimate,
    loss_token_weights,
    policy_loss_per_token,
    rollout_correction_weights,
    value_loss_per_token,
)
from ..errors import RLHFError
from .distributed import full_norm, sync_gradients
from .rollout import Rollout


class NonFiniteError(RLHFError):
    """A loss, reward or gradient became NaN or infinite."""


class PPOUpdate:
    one_pass = False  # set by PPOTrainer: the update's own log-probs are the old ones
    _own_logprobs: torch.Tensor | None = None
    # ----- phase 5: PPO epochs over minibatches of micro-batches ----------------------------
    STATS = (
        "loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "policy/ratio",
        "policy/entropy", "val/clipfrac",
    )  # fmt: skip

    def update(self, b: Rollout) -> dict[str, float]:
        """PPO epochs on the global batch `b`; this process runs its share of each minibatch.

        Every token's loss is weighted as --loss-aggregation says, with weights computed once for
        the global minibatch (by default 1 / its tokens), so summing the micro-batches' losses (and,
        across processes, their gradients) gives the minibatch's loss exactly, whatever the split
        (ppo-details 17). The diagnostics (approx-KL, clip fractions, ratio, entropy) are token
        means of the minibatch whatever the aggregation: its weights are for the loss alone
        (under seq-mean-token-sum-norm they do not even sum to 1). `loss/policy` and
        `loss/value` are the losses as aggregated, what the optimizer minimises.
        """
        cfg, world = self.config, self.world
        B, M = len(b), cfg.minibatch_size
        share = M // world.size
        micro = cfg.micro_batch_size or share
        response = b.query_response[:, b.P :]  # (B, R)
        rows = []  # per minibatch: the weighted sums of STATS
        grad_norms = []
        # With `one_pass` the update's own log-probs are the old ones; each row's are kept here
        # (on the process that ran it) for the metrics and the KL.
        self._own_logprobs = torch.zeros_like(b.logprobs) if self.one_pass else None  # (B, R)
        self._train_mode(True)
        try:
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(B, generator=self.cpu_generator).to(b.response_mask.device)
                for start in range(0, B, M):
                    mb = order[start : start + M]  # (M,)
                    weight = loss_token_weights(
                        b.response_mask[mb], cfg.loss_aggregation, cfg.response_tokens
                    )  # (M, R)
                    token_mean = loss_token_weights(b.response_mask[mb], "token-mean")  # (M, R)
                    mine = slice(world.rank * share, (world.rank + 1) * share)
                    sums = torch.zeros(len(self.STATS), device=self.device)
                    bad = False
                    self.optimizer.zero_grad(set_to_none=True)
                    for s in range(mine.start, mine.stop, micro):
                        idx = mb[s : min(s + micro, mine.stop)]  # (m,)
                        w = weight[s : min(s + micro, mine.stop)]  # (m, R)
                        tw = token_mean[s : min(s + micro, mine.stop)]  # (m, R)
                        # Processes average gradients once, in the minibatch's last backward.
                        with sync_gradients(self.trained, s + micro >= mine.stop):
                            loss, micro_sums = self._micro_loss(b, idx, w, response, tw)
                            bad = bad or not bool(torch.isfinite(loss))
                            # Gradient averaging over processes divides by their number; undo it.
                            (loss * world.size).backward()
                        sums += micro_sums
                    grad_norm = full_norm(
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    )
                    if bad:
                        self._raise_non_finite("loss")
                    if not torch.isfinite(grad_norm):
                        self._raise_non_finite("gradient norm")
                    self.optimizer.step()
                    self.scheduler.step()
                    rows.append(sums)
                    grad_norms.append(float(grad_norm))
        finally:
            self._train_mode(False)
        if self.one_pass:
            # Every row was run by exactly one process: the sum is the whole batch's log-probs.
            b.logprobs = world.all_reduce_sum(self._own_logprobs) * b.response_mask  # (B, R)
            kl = kl_estimate(b.logprobs, b.ref_logprobs, cfg.kl_estimator)  # (B, R)
            b.kl = torch.where(b.response_mask.bool(), kl, torch.zeros_like(kl))  # (B, R)
            self._own_logprobs = None
        totals = world.all_reduce_sum(torch.stack(rows)).cpu()  # (n_minibatches, n_stats)
        stats = dict(zip(self.STATS, totals.mean(0).tolist()))
        stats["policy/first_ratio"] = float(totals[0, self.STATS.index("policy/ratio")])
        stats["policy/grad_norm"] = sum(grad_norms) / len(grad_norms)
        if self.critic_free:  # no value function was trained
            del stats["loss/value"], stats["val/clipfrac"]
        return stats

    def _micro_loss(
        self,
        b: Rollout,
        idx: torch.Tensor,
        w: torch.Tensor,
        response: torch.Tensor,
        tw: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of rows `idx` weighted by `w` (the loss aggregation's weights), and their
        parts of STATS: the losses weighted by `w`, the diagnostics by `tw` (token-mean weights of
        the minibatch)."""
        cfg = self.config
        mask = b.response_mask[idx]  # (m, R)
        # Trim the padding these rows share, so short micro-batches run short forward passes.
        R = int(mask.sum(1).max())
        P = int(b.attention_mask[idx, : b.P].sum(1).max())  # longest prompt (left-padded)
        ids = b.query_response[idx, b.P - P : b.P + R]  # (m, P+R)
        attn = b.attention_mask[idx, b.P - P : b.P + R]  # (m, P+R)
        mask, w, tw = mask[:, :R], w[:, :R], tw[:, :R]  # (m, R)
        logits, values = self._policy_forward(ids, attn, P)  # (m, R, V), (m, R)
        logp_all = torch.log_softmax(logits, dim=-1)  # (m, R, V), float32
        logprobs = logp_all.gather(-1, response[idx, :R].unsqueeze(-1)).squeeze(-1)  # (m, R)
        if self._own_logprobs is not None:  # one pass: the old log-probs are these
            old = logprobs.detach()  # (m, R)
            self._own_logprobs[idx, :R] = old
        else:
            old = b.logprobs[idx, :R]  # (m, R)
        pg, clipped, log_ratio = policy_loss_per_token(
            logprobs, old, b.advantages[idx, :R], mask, cfg.clip_eps
        )  # (m, R) x3
        if cfg.correction != "none" and b.engine_logprobs is not None:
            # The samples came from the rollout engine's q, not the trainer's p: reweight the
            # policy gradient toward p (`core.correction`); the KL and value terms are left as
            # they are, as in TRL's GRPO.
            pg = pg * rollout_correction_weights(
                old, b.engine_logprobs[idx, :R], mask, cfg.correction, cfg.rollout_correction_cap
            )  # (m, R)
        vf, vf_clipped = value_loss_per_token(
            values, b.values[idx, :R], b.returns[idx, :R], mask, cfg.value_clip_eps
        )  # (m, R) x2
        per_token = pg if self.critic_free else pg + cfg.vf_coef * vf  # (m, R)
        if cfg.kl_in == "loss":  # ppo-details 13
            # Masked positions take the policy's own log-prob (KL 0) so garbage there cannot
            # overflow into a nan gradient.
            ref = torch.where(mask.bool(), b.ref_logprobs[idx, :R], logprobs.detach())  # (m, R)
            per_token = per_token + self.kl_ctl.value * kl_estimate(logprobs, ref, cfg.kl_estimator)
        loss = (w * per_token).sum()
        with torch.no_grad():
            # One row at a time: the entropy's (R, V) temporaries would otherwise rival the
            # logits themselves in memory.
            entropy = torch.stack(
                [entropy_from_logprobs(row) for row in logp_all.detach()]
            )  # (m, R)
            sums = torch.stack(
                [
                    (w * pg).sum(),
                    (w * vf).sum(),
                    (tw * 0.5 * log_ratio.pow(2)).sum(),
                    (tw * clipped).sum(),
                    (tw * log_ratio.exp()).sum(),
                    (tw * entropy).sum(),
                    (tw * vf_clipped).sum(),
                ]
            ).to(self.device)
        return loss, sums

    def _raise_non_finite(self, name: str) -> None:
        raise NonFiniteError(
            f"step {self.step_count + 1}: the {name} is not finite; no weights were changed by this "
            "minibatch (try a lower --lr, or check the reward model's scores)"
        )
