"""The rollout batch of a PPO step, and how its pieces are padded and joined.

Shapes: B rows (sequences), P prompt tokens (left-padded), R response tokens (right-padded after
EOS).

A step builds its batch in pieces: chunks of `--rollout-batch-size` rows on each process, then the
processes' shares. Pieces have their own P and R; `join` re-pads them to the longest and stacks
them, so the joined batch is what one pass over all rows would have produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO computes from it (all detached)."""

    query_response: torch.Tensor  # (B, P+R) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt tokens and response tokens up to EOS
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R), zeros without a critic
    scores: torch.Tensor  # (B,) the reward PPO optimises (shaped, then any missing-EOS penalty)
    kl: torch.Tensor  # (B, R) per-token KL estimate, 0 after EOS
    prompts: list[str]
    texts: list[str]
    ended: list[bool]
    rewards: torch.Tensor | None = None  # (B, R), set by the advantage phase
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    timings: dict[str, float] = field(default_factory=dict)
    reward_terms: torch.Tensor | None = None  # (B, T) each reward term's value, NaN where none
    unshaped_scores: torch.Tensor | None = None  # (B,) the reward before --reward-shaping, if on
    ref_scores: torch.Tensor | None = None  # (B, M) rewards of par's reference responses
    engine_logprobs: torch.Tensor | None = None  # (B, R) the rollout engine's, 0 after EOS

    @property
    def P(self) -> int:
        return self.query_response.shape[1] - self.response_mask.shape[1]

    @property
    def R(self) -> int:
        return self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.query_response.shape[0]


# Per-token tensors and how they are padded on the right (all with 0).
_RESPONSE_FIELDS = ("response_mask", "logprobs", "ref_logprobs", "values", "kl")


def repad(b: Rollout, P: int, R: int, pad_token_id: int) -> Rollout:
    """The same rows with prompts left-padded to P and responses right-padded to R tokens."""
    grow_p, grow_r = P - b.P, R - b.R
    if grow_p == 0 and grow_r == 0:
        return b
    assert grow_p >= 0 and grow_r >= 0, "repad only adds padding"
    ids = F.pad(b.query_response, (grow_p, grow_r), value=pad_token_id)  # (B, P+R)
    mask = F.pad(b.attention_mask, (grow_p, grow_r), value=0)  # (B, P+R)
    per_token = {name: F.pad(getattr(b, name), (0, grow_r)) for name in _RESPONSE_FIELDS}
    return Rollout(
        ids, mask, per_token["response_mask"], per_token["logprobs"], per_token["ref_logprobs"],
        per_token["values"], b.scores, per_token["kl"], b.prompts, b.texts, b.ended,
        timings=dict(b.timings), reward_terms=b.reward_terms, unshaped_scores=b.unshaped_scores,
        ref_scores=b.ref_scores,
        engine_logprobs=None if b.engine_logprobs is None else F.pad(b.engine_logprobs, (0, grow_r)),
    )  # fmt: skip


def join(pieces: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts row-wise after padding them to a common P and R; timings are summed."""
    if len(pieces) == 1:
        return pieces[0]
    P, R = max(b.P for b in pieces), max(b.R for b in pieces)
    pieces = [repad(b, P, R, pad_token_id) for b in pieces]
    tensors = {
        f.name: torch.cat([getattr(b, f.name) for b in pieces])
        for f in fields(Rollout)
        if isinstance(getattr(pieces[0], f.name), torch.Tensor)
    }
    lists = {
        name: [x for b in pieces for x in getattr(b, name)]
        for name in ("prompts", "texts", "ended")
    }
    timings: dict[str, float] = {}
    for b in pieces:
        for k, v in b.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return Rollout(**tensors, **lists, timings=timings)


def gather(b: Rollout, world, pad_token_id: int) -> Rollout:
    """Every process's rows, in rank order, on every process (the identity in one process)."""
    if world.size == 1:
        return b
    sizes = world.all_reduce_max(torch.tensor([b.P, b.R]))
    b = repad(b, int(sizes[0]), int(sizes[1]), pad_token_id)
    tensors = {
        f.name: world.gather_rows(getattr(b, f.name))
        for f in fields(Rollout)
        if isinstance(getattr(b, f.name), torch.Tensor)
    }
    lists = {name: world.gather_objects(getattr(b, name)) for name in ("prompts", "texts", "ended")}
    return Rollout(**tensors, **lists, timings=dict(b.timings))
