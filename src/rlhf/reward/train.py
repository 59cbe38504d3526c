"""`rlhf train-reward` (the seed's task 2): fit a `RewardModel` with the Bradley-Terry loss on
preference pairs, normalise it on samples from the base model, evaluate it on held-out pairs, save.

Shapes: B pairs, T tokens.

The pairs come from the user's file or from `create_preference_dataset` (`preferences`); the loss
and the evaluation are in `loss`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core import bradley_terry_loss
from ..data import atomic_write_json
from ..errors import ConfigError
from ..models.generation import pad_right
from ..models.lora import apply_lora
from ..models.reward_ensemble import RewardEnsemble
from ..models.reward_model import RewardModel
from ..tracking import RunLogger, progress_bar, save_config, set_seed, tracking
from .config import RewardConfig
from .loss import encode_texts, evaluate_reward_model
from .preferences import (
    default_task,
    holds_conversations,
    label_ceiling,
    preference_pairs,
    read_preference_file,
    split_pairs,
)

ENSEMBLE_LORA_R = 8
"""the adapters' rank of an ensemble's members when --lora-r is not given"""


def _resolve_max_length(cfg: RewardConfig, limit: int | None, model_dir) -> RewardConfig:
    """The config with --max-length set: the user's value if the model can take it, else 256 or
    the model's position limit if lower; the normalisation samples must fit in it too."""
    if cfg.max_length is not None and limit is not None and cfg.max_length > limit:
        raise ConfigError(
            f"--max-length {cfg.max_length} exceeds the {limit} positions of the model in "
            f"{model_dir}; use --max-length {limit} or less"
        )
    max_length = cfg.max_length or min(256, limit or 256)
    if cfg.normalise_samples and cfg.normalise_response_tokens + 1 >= max_length:
        raise ConfigError(
            f"--normalise-response-tokens {cfg.normalise_response_tokens} plus EOS leaves no room "
            f"for a prompt within --max-length {max_length}; lower --normalise-response-tokens"
        )
    return dataclasses.replace(cfg, max_length=max_length)


@torch.no_grad()
def _reference_scores(cfg, lm, reward_models, tokenizer, shuffled, device) -> torch.Tensor:
    """Raw scores (M, N) by each of `reward_models` of `cfg.normalise_samples` responses sampled
    from the base model as PPO samples them (full softmax at temperature 1,
    `normalise_response_tokens` long, left-padded prompts) and scored from token ids as PPO scores
    them (`score_responses`). The samples are drawn once for all M models."""
    from ..models.forward import autocast
    from ..models.generation import encode_prompts, sample_responses
    from ..models.reward_model import score_responses

    n = cfg.normalise_samples
    # The pairs' prompts in their shuffled order, cycled when there are fewer pairs than samples.
    prompts = [shuffled[i % len(shuffled)] for i in range(n)]
    # Room for the response and a scoring EOS; PPO's prompts are this short already (its check).
    keep = cfg.max_length - cfg.normalise_response_tokens - 1
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    scores = []
    for s in range(0, n, 64):
        ids, mask, _ = encode_prompts(tokenizer, prompts[s : s + 64], keep, device)  # (B, P)
        with autocast(device):
            response = sample_responses(
                lm, ids, mask, cfg.normalise_response_tokens, eos, pad, generator=gen
            )  # (B, R)
            scores.append(
                torch.stack(
                    [score_responses(m, ids, mask, response, eos, pad, True) for m in reward_models]
                )
            )  # (M, B)
    return torch.cat(scores, 1)  # (M, N)


@dataclasses.dataclass
class _Data:
    """The encoded training pairs and the held-out pairs, as `_fit` reads them."""

    chosen_rows: list[list[int]]
    rejected_rows: list[list[int]]
    train_pairs: object
    eval_pairs: object
    tokenizer: object
    device: torch.device


def _fit(cfg, reward_model, params, data: _Data, seed: int, logger, bar, step: int, tag: dict):
    """Bradley-Terry training of `params` of one reward model, batches drawn from `seed`
    (bootstrap resampled first with --ensemble-bootstrap); returns the last logged step."""
    from ..models.forward import autocast

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data.train_pairs)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total_steps)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randint(n, (n,), generator=generator) if cfg.ensemble_bootstrap else None  # (n,)
    margins = torch.tensor([m if m is not None else 0.0 for m in data.train_pairs.margins])
    has_margin = any(m is not None for m in data.train_pairs.margins)
    tokenizer, device = data.tokenizer, data.device
    who = f"member {tag['reward/member']}: " if tag else ""
    for epoch in range(cfg.epochs):
        reward_model.train()
        perm = torch.randperm(n, generator=generator)  # (n,)
        perm = (pool[perm] if pool is not None else perm).tolist()
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            rows = [data.chosen_rows[i] for i in idx] + [data.rejected_rows[i] for i in idx]
            ids, mask = pad_right(rows, tokenizer.pad_token_id, device)  # (2B, T)
            with autocast(device):
                rewards = reward_model(ids, mask).float()  # (2B,)
            r_c, r_r = rewards[: len(idx)], rewards[len(idx) :]  # (B,), (B,)
            margin = margins[idx].to(device) if has_margin else None
            loss = bradley_terry_loss(r_c, r_r, margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = {
                "reward/loss": loss.item(),
                "reward/accuracy": (r_c > r_r).float().mean().item(),
                "reward/margin": (r_c - r_r).mean().item(),
                "reward/lr": scheduler.get_last_lr()[0],
                "reward/epoch": epoch + s / len(perm),
                **tag,
            }
            logger.log(step, metrics)
            bar.update()
            bar.set_postfix(
                loss=f"{metrics['reward/loss']:.3f}",
                acc=f"{metrics['reward/accuracy']:.2f}",
                refresh=False,
            )
        held_out = evaluate_reward_model(reward_model, tokenizer, data.eval_pairs, cfg.max_length)
        logger.log(
            step,
            {
                "reward/eval_accuracy": held_out["accuracy"],
                "reward/eval_loss": held_out["loss"],
                **tag,
            },
        )
        bar.write(
            f"{who}epoch {epoch + 1}/{cfg.epochs}: held-out accuracy {held_out['accuracy']:.3f}"
        )
    return step


def train_reward(
    cfg: RewardConfig, progress: bool = True, figures: Callable[[Path], list[Path]] | None = None
) -> dict:
    """Train, normalise, evaluate and save a reward model (or an ensemble of them, --ensemble);
    returns the evaluation dict."""

    from ..models.generation import apply_chat_template, render_conversation_pairs
    from ..models.loading import (
        apply_eos_option,
        check_model_dir,
        load_causal_lm,
        load_tokenizer,
        match_vocab,
        pick_device,
        position_limit,
    )

    cfg.validate()
    device = pick_device(cfg.device)
    start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Validate the inputs before any work: the data file first, then the model folder.
    file_pairs = read_preference_file(cfg)
    conversations = holds_conversations(file_pairs, cfg.data, cfg.model)
    if cfg.model:
        check_model_dir(cfg.model)
        cfg = _resolve_max_length(cfg, position_limit(cfg.model), cfg.model)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        apply_eos_option(tokenizer, cfg.eos_token, cfg.model, conversations or cfg.chat_template)
        if cfg.chat_template:
            apply_chat_template(tokenizer, [""], f"the tokenizer in {cfg.model}")
        if conversations:  # rendered now, so a template that refuses them fails before loading
            file_pairs = render_conversation_pairs(
                tokenizer, file_pairs, cfg.data, f"the tokenizer in {cfg.model}"
            )
        lm = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
        match_vocab(lm, tokenizer, cfg.model)
    else:
        lm, tokenizer, base_dir = default_task(cfg.cache_dir, progress)
        cfg = _resolve_max_length(cfg, position_limit(base_dir), base_dir)
        apply_eos_option(tokenizer, cfg.eos_token, base_dir, False)
    # Seeded after loading: pretraining the base model on a cold cache draws from the global RNG,
    # and the head's initialisation below must not depend on whether the cache was warm.
    set_seed(cfg.seed)
    lm.to(device)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, cfg, command="train-reward")

    # 2. Preference pairs: the user's file, or sampled from the base model and labelled by the judge.
    pairs = preference_pairs(file_pairs, lm, tokenizer, cfg, out, progress)
    if cfg.chat_template and not conversations:  # conversations are rendered already
        pairs.prompts = apply_chat_template(
            tokenizer, pairs.prompts, f"the tokenizer in {cfg.model}"
        )
    eval_pairs, train_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.data)
    chosen_rows, n_trunc = encode_texts(
        tokenizer, train_pairs.prompts, train_pairs.chosen, cfg.max_length
    )
    rejected_rows, n_trunc_r = encode_texts(
        tokenizer, train_pairs.prompts, train_pairs.rejected, cfg.max_length
    )
    if n_trunc + n_trunc_r:
        print(
            f"warning: truncated {n_trunc + n_trunc_r} sequences longer than --max-length {cfg.max_length} tokens"
        )

    # 3. Bradley-Terry training of a copy of the base model with a fresh scalar head.
    # With LoRA the base stays frozen and only the adapters and the head train; the saved reward
    # model is then the adapter, which PPO can put on its policy's base (models/lora.py).
    # An ensemble's members are LoRA adapters on one copy of the base, trained one after another.
    if cfg.ensemble > 1:
        lora = cfg if cfg.lora_r else dataclasses.replace(cfg, lora_r=ENSEMBLE_LORA_R)
        reward_model = RewardEnsemble.from_base(
            copy.deepcopy(lm), lora, cfg.ensemble, seed=cfg.seed, tokenizer=tokenizer
        ).to(device)
        members = list(reward_model.members)
    else:
        base = (
            apply_lora(copy.deepcopy(lm), cfg, seed=cfg.seed) if cfg.lora_r else copy.deepcopy(lm)
        )
        reward_model = RewardModel(base, freeze_base=cfg.freeze_base, tokenizer=tokenizer)
        reward_model = reward_model.to(device)
        members = [reward_model]
    data = _Data(chosen_rows, rejected_rows, train_pairs, eval_pairs, tokenizer, device)
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    bar = progress_bar(
        total=cfg.epochs * steps_per_epoch * len(members),
        desc="train reward model",
        disable=not progress,
    )
    step = 0
    with RunLogger(out, **tracking(cfg, figures)) as logger:
        for k, member in enumerate(members):
            if len(members) > 1:  # only member k's adapter and head train now
                reward_model.requires_grad_(False)
                params = reward_model.member_parameters(k)
                for param in params:
                    param.requires_grad_(True)
                tag = {"reward/member": k}
            else:
                params = [p for p in member.parameters() if p.requires_grad]
                tag = {}
            step = _fit(cfg, member, params, data, cfg.seed + k, logger, bar, step, tag)
    bar.close()
    reward_model.eval()

    # 4. Normalise: samples from the base (reference) policy score mean 0, std 1 (ppo-details 9),
    #    fitted on what PPO scores: responses of PPO's length from left-padded prompts, scored from
    #    token ids by the function PPOTrainer uses.
    #    An ensemble's members each get their own gain and bias, from the same samples.
    if cfg.normalise_samples:
        shuffled = eval_pairs.prompts + train_pairs.prompts  # split_pairs' order
        raw = _reference_scores(cfg, lm, members, tokenizer, shuffled, device)  # (M, N)
        for member, member_raw in zip(members, raw):
            member.set_normalisation(member_raw)

    # 5. Evaluate on the held-out pairs and save. An ensemble reports its mean's accuracy and each
    #    member's.
    result = evaluate_reward_model(reward_model, tokenizer, eval_pairs, cfg.max_length)
    result["ceiling"] = label_ceiling(train_pairs)
    result["n_train_pairs"] = len(train_pairs)
    if len(members) > 1:
        result["ensemble"] = len(members)
        result["members"] = [
            {
                **evaluate_reward_model(member, tokenizer, eval_pairs, cfg.max_length),
                "gain": float(member.reward_gain),
                "bias": float(member.reward_bias),
            }
            for member in members
        ]
        result["member_accuracy"] = [m["accuracy"] for m in result["members"]]
    else:
        result["gain"] = float(reward_model.reward_gain)
        result["bias"] = float(reward_model.reward_bias)
    result["seconds"] = round(time.perf_counter() - start, 1)
    reward_model.save_pretrained(out / "reward_model")
    atomic_write_json(out / "reward_eval.json", result)
    return result
