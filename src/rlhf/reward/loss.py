"""The Bradley-Terry reward-model loss on text or tokens, scoring texts, and held-out evaluation.

Shapes: B pairs, T tokens, N texts.
"""

from __future__ import annotations

import torch

from ..core import bradley_terry_loss
from ..models.forward import device_of
from ..models.generation import pad_right
from ..models.reward_model import RewardModel
from .preferences import Pairs


def join_text(prompt: str, response: str) -> str:
    """Prompt and response as one text; a space goes between them unless one side has it."""
    if not prompt or prompt[-1].isspace() or response[:1].isspace():
        return prompt + response
    return prompt + " " + response


def encode_texts(
    tokenizer, prompts: list[str], responses: list[str], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids of prompt + response + EOS, truncated from the left; returns (rows, number truncated)."""
    eos = tokenizer.eos_token_id
    rows, truncated = [], 0
    for ids in tokenizer([join_text(p, r) for p, r in zip(prompts, responses)])["input_ids"]:
        ids = ids + [eos]
        if len(ids) > max_length:
            truncated += 1
            ids = ids[-max_length:]
        rows.append(ids)
    return rows, truncated


def _preference_targets(preference, n: int, device) -> torch.Tensor:
    """Probability that A is preferred, per pair: from "A"/"B" labels or a tensor."""
    if isinstance(preference, torch.Tensor):
        return preference.float().to(device).reshape(n)
    labels = [preference] * n if isinstance(preference, str) else list(preference)
    if any(lab not in ("A", "B") for lab in labels):
        raise ValueError(f"preference must be 'A' or 'B', got {labels!r}")
    return torch.tensor([1.0 if lab == "A" else 0.0 for lab in labels], device=device)


def reward_model_loss(
    reward_model: RewardModel,
    prompt,
    response_A,
    response_B,
    preference,
    margin=None,
    tokenizer=None,
) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_preferred - r_other - margin), averaged over pairs.

    Text form (the seed's): `prompt`, `response_A`, `response_B` are strings or equal-length lists
    of strings, `preference` is "A"/"B" or a list of them; the reward model's tokenizer (or
    `tokenizer`) encodes prompt + response + EOS. Token form: `prompt` is None and `response_A`,
    `response_B` are `(input_ids, attention_mask)` pairs of whole sequences; `preference` may also be
    a tensor of probabilities that A is preferred (soft labels).
    """
    if prompt is None:
        ids_a, mask_a = response_A
        ids_b, mask_b = response_B
    else:
        tokenizer = tokenizer or reward_model.tokenizer
        if tokenizer is None:
            raise ValueError(
                "text inputs need a tokenizer: pass tokenizer= or set reward_model.tokenizer"
            )
        single = isinstance(response_A, str)
        prompts = [prompt] if single else list(prompt)
        resp_a = [response_A] if single else list(response_A)
        resp_b = [response_B] if single else list(response_B)
        if not len(prompts) == len(resp_a) == len(resp_b):
            raise ValueError("prompt, response_A and response_B must have the same length")
        device = device_of(reward_model)  # a RewardModel or a RewardEnsemble
        rows_a, _ = encode_texts(tokenizer, prompts, resp_a, tokenizer.model_max_length)
        rows_b, _ = encode_texts(tokenizer, prompts, resp_b, tokenizer.model_max_length)
        ids_a, mask_a = pad_right(rows_a, tokenizer.pad_token_id, device)
        ids_b, mask_b = pad_right(rows_b, tokenizer.pad_token_id, device)
    n = ids_a.shape[0]
    r_a = reward_model(ids_a, mask_a)  # (B,)
    r_b = reward_model(ids_b, mask_b)  # (B,)
    p_a = _preference_targets(preference, n, r_a.device)  # (B,)
    if bool(((p_a == 0) | (p_a == 1)).all()):
        chosen = torch.where(p_a > 0.5, r_a, r_b)  # (B,)
        rejected = torch.where(p_a > 0.5, r_b, r_a)  # (B,)
        return bradley_terry_loss(chosen, rejected, margin)
    if margin is not None:
        raise ValueError("a margin needs hard labels (preference 'A'/'B' or 0/1)")
    # Soft labels: cross-entropy against P(A preferred), both orderings weighted.
    log_p_a = torch.nn.functional.logsigmoid(r_a - r_b)  # (B,)
    log_p_b = torch.nn.functional.logsigmoid(r_b - r_a)  # (B,)
    return -(p_a * log_p_a + (1 - p_a) * log_p_b).mean()


@torch.no_grad()
def score_texts(
    reward_model: RewardModel, tokenizer, prompts: list[str], responses: list[str],
    max_length: int = 256, batch_size: int = 128, raw: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Reward of each prompt + response + EOS, shape (N,)."""
    device = device_of(reward_model)  # a RewardModel or a RewardEnsemble
    rows, _ = encode_texts(tokenizer, prompts, responses, max_length)
    scores = []
    forward = reward_model.raw_forward if raw else reward_model
    for s in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[s : s + batch_size], tokenizer.pad_token_id, device)
        scores.append(forward(ids, mask).float())
    return torch.cat(scores)  # (N,)


def evaluate_reward_model(
    reward_model: RewardModel, tokenizer, pairs: Pairs, max_length: int
) -> dict:
    """Held-out accuracy (against the noiseless gold ordering when there is one), loss and margin."""
    was_training = reward_model.training
    reward_model.eval()
    r_c = score_texts(reward_model, tokenizer, pairs.prompts, pairs.chosen, max_length)  # (N,)
    r_r = score_texts(reward_model, tokenizer, pairs.prompts, pairs.rejected, max_length)  # (N,)
    reward_model.train(was_training)
    diff = r_c - r_r  # (N,)
    result = {
        "n_pairs": len(pairs),
        "label_accuracy": (diff > 0).float().mean().item(),
        "loss": bradley_terry_loss(r_c, r_r).item(),
        "margin": diff.mean().item(),
    }
    if pairs.gold_chosen is not None:
        gold_diff = torch.tensor(pairs.gold_chosen) - torch.tensor(pairs.gold_rejected)  # (N,)
        decided = gold_diff != 0
        agree = torch.sign(diff.cpu()) == torch.sign(gold_diff)
        result["accuracy"] = agree[decided].float().mean().item()
        result["n_gold_decided"] = int(decided.sum())
    else:
        result["accuracy"] = result["label_accuracy"]
    return result
