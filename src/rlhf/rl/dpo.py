"""`rlhf dpo`: Direct Preference Optimization (Rafailov et al. 2023; IPO, Azar et al. 2023) from
the same preference pairs as `rlhf train-reward`, against a frozen reference, with no reward model.

Shapes: B pairs (2B sequences: the chosen rows, then the rejected rows), T tokens, R response
tokens, V vocabulary.

A pair's log-probability under a model is the sum over its response tokens (the prompt is masked
out) of log p(token | everything before it). The reference's log-probs are computed once, up
front. Held-out implicit-reward accuracy is measured before and after training; on the built-in
task the trained policy is also sampled on fresh prompts (--eval-split) and scored by the gold
judge, with its KL to the reference measured the way PPO's `objective/kl` is (k1 summed over response tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core import dpo_loss, logprobs_from_logits
from ..data import atomic_write_json, write_jsonl
from ..models.forward import (
    accepts_kwarg,
    autocast,
    compile_forward,
    position_ids_from_mask,
    shared_prompt_logits,
)
from ..models.generation import apply_chat_template, render_conversation_pairs
from ..models.lora import AdaptersOff, adapter_dropout, apply_lora
from ..models.policy import save_lm
from ..reward.loss import encode_texts
from ..reward.preferences import (
    Pairs,
    holds_conversations,
    preference_pairs,
    read_preference_file,
    split_pairs,
)
from ..tracking import (
    RunLogger,
    progress_bar,
    quiet_transformers_bars,
    save_config,
    set_seed,
    tracking,
)
from .dpo_config import DPOConfig


def encode_pairs(tokenizer, pairs: Pairs, max_length: int) -> tuple[list, list, int]:
    """Token rows of prompt + chosen and prompt + rejected, each with its response-token mask.

    The rows are `encode_texts`' (the reward model's encoding: prompt, response, EOS). The prompt
    is the longest common prefix of the row and the prompt's own tokens, so a BPE merge across the
    boundary counts as response. Over-long rows lose tokens from the left. Returns
    (chosen [(ids, response_mask)], rejected [...], number of rows cut).
    """
    prompt_rows = tokenizer(list(pairs.prompts))["input_ids"]
    cut = 0
    encoded = []
    for responses in (pairs.chosen, pairs.rejected):
        rows, _ = encode_texts(tokenizer, pairs.prompts, responses, 10**9)
        side = []
        for row, prompt in zip(rows, prompt_rows):
            n = next(
                (i for i, (a, b) in enumerate(zip(row, prompt)) if a != b),
                min(len(row), len(prompt)),
            )
            drop = max(0, len(row) - max_length)
            cut += drop > 0
            # Position 0 predicts nothing, so at least the first kept token is context.
            n_context = max(1, n - drop)
            side.append((row[drop:], [0] * n_context + [1] * (len(row) - drop - n_context)))
        encoded.append(side)
    return encoded[0], encoded[1], cut


def sequence_logps(lm, rows: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and number of response tokens per row: (2B,), (2B,).

    Each row is laid out as its context (the tokens before its first response token),
    left-padded, then its response, right-padded: (N, P + R). The LM head runs only on the
    response positions (TRL's DPOTrainer does as much), and a context shared by several rows (a
    pair's chosen and rejected) runs through the model once (`shared_prompt_logits`).
    """
    starts = [max(1, r[1].index(1)) if 1 in r[1] else len(r[0]) for r in rows]  # first response
    contexts = [r[0][:n] for r, n in zip(rows, starts)]
    responses = [r[0][n:] for r, n in zip(rows, starts)]
    keeps = [r[1][n:] for r, n in zip(rows, starts)]
    P = max(len(c) for c in contexts)
    R = max(1, max(len(x) for x in responses))
    N = len(rows)
    ids = torch.full((N, P + R), pad_id, dtype=torch.long)  # (N, P+R)
    mask = torch.zeros((N, P + R), dtype=torch.long)  # (N, P+R)
    keep = torch.zeros((N, R), dtype=torch.bool)  # (N, R): the response tokens that count
    for i, (c, x, k) in enumerate(zip(contexts, responses, keeps)):
        ids[i, P - len(c) : P] = torch.tensor(c, dtype=torch.long)
        mask[i, P - len(c) : P] = 1
        if x:
            ids[i, P : P + len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, P : P + len(x)] = 1
            keep[i, : len(x)] = torch.tensor(k, dtype=torch.bool)
    ids, mask, keep = ids.to(device), mask.to(device), keep.to(device)
    with autocast(ids.device):
        logits = shared_prompt_logits(lm, ids, mask, P, R + 1)  # (N, R+1, V)
        if logits is None:
            kwargs = {"logits_to_keep": R + 1} if accepts_kwarg(lm, "logits_to_keep") else {}
            logits = lm(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False, **kwargs,
            ).logits  # (N, R+1, V), or (N, P+R, V)  # fmt: skip
    logits = logits[:, -(R + 1) : -1]  # (N, R, V): position P-1+t predicts response token t
    logp = logprobs_from_logits(logits, ids[:, P:])  # (N, R)
    return torch.where(keep, logp, torch.zeros_like(logp)).sum(1), keep.sum(1).float()  # (N,) x2


class DPOStep:
    """One DPO optimizer step on a batch of pairs: AdamW, linear decay to zero over
    `total_steps`, gradients clipped at `max_grad_norm`.

    The model's own dropout stays off (as loaded); LoRA's adapter dropout acts during the step's
    forward pass only.
    """

    def __init__(
        self,
        policy,
        lr: float,
        total_steps: int,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        max_grad_norm: float = 1.0,
    ):
        self.policy = policy
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.max_grad_norm = max_grad_norm
        self.trained = [
            p for p in policy.parameters() if p.requires_grad
        ]  # the adapters under LoRA
        self.device = self.trained[0].device
        # The fused kernel updates every tensor in one pass (about 5x less time per step than the
        # default loop on 2 CPU cores); it needs floating-point CPU or CUDA parameters.
        fused = self.device.type in ("cpu", "cuda") and all(
            p.is_floating_point() for p in self.trained
        )
        self.optimizer = torch.optim.AdamW(self.trained, lr=lr, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 1.0 - s / total_steps
        )

    def run(
        self, chosen: list, rejected: list, ref_logps: torch.Tensor, pad_id: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]:
        """Step on the pairs (`encode_pairs` rows) with their reference log-probs (B, 2).

        Returns ((loss, chosen rewards (B,), rejected rewards (B,)), seconds per phase).
        """
        start = time.perf_counter()
        B = len(chosen)
        adapter_dropout(self.policy, True)
        try:
            logps, lengths = sequence_logps(self.policy, chosen + rejected, pad_id, self.device)
        finally:
            adapter_dropout(self.policy, False)  # (2B,) x2
        ref_logps = ref_logps.to(self.device)
        losses, r_c, r_r = dpo_loss(
            logps[:B], logps[B:], ref_logps[:, 0], ref_logps[:, 1], self.beta, self.loss_type,
            self.label_smoothing, lengths[:B], lengths[B:],
        )  # (B,) x3  # fmt: skip
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trained, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        timing = {"forward_backward": middle - start, "optimizer": time.perf_counter() - middle}
        return (loss.detach(), r_c.detach(), r_r.detach()), timing


@torch.no_grad()
def batched_logps(
    lm, chosen: list, rejected: list, pad_id: int, device, batch_size: int
) -> torch.Tensor:
    """Sequence log-probs (B, 2) of every pair, in batches: column 0 chosen, column 1 rejected."""
    out = []
    for s in range(0, len(chosen), batch_size):
        logps, _ = sequence_logps(
            lm, chosen[s : s + batch_size] + rejected[s : s + batch_size], pad_id, device
        )
        out.append(logps.view(2, -1).T)  # (b, 2)
    return torch.cat(out)  # (B, 2)


def implicit_reward_eval(
    lm, chosen, rejected, ref_logps, pairs: Pairs, cfg: DPOConfig, pad_id, device
) -> dict:
    """Held-out DPO loss, implicit-reward accuracy (ties count as wrong, as in TRL), margin."""
    logps = batched_logps(lm, chosen, rejected, pad_id, device, cfg.batch_size)  # (B, 2)
    lengths = torch.tensor([[sum(c[1]), sum(r[1])] for c, r in zip(chosen, rejected)])  # (B, 2)
    lengths = lengths.float().to(device)  # (B, 2)
    losses, r_c, r_r = dpo_loss(
        logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], cfg.beta, cfg.loss_type,
        cfg.label_smoothing, lengths[:, 0], lengths[:, 1],
    )  # fmt: skip
    result = {
        "n_pairs": len(pairs),
        "loss": losses.mean().item(),
        "accuracy": (r_c > r_r).float().mean().item(),
        "ties": (r_c == r_r).float().mean().item(),  # all of them while the policy is the reference
        "margin": (r_c - r_r).mean().item(),
    }
    if pairs.gold_chosen is not None:  # against the noiseless gold ordering, as reward_eval.json
        gold_diff = torch.tensor(pairs.gold_chosen) - torch.tensor(pairs.gold_rejected)  # (B,)
        decided = gold_diff != 0
        agree = torch.sign((r_c - r_r).cpu()) == torch.sign(gold_diff)  # (B,)
        result["gold_accuracy"] = agree[decided].float().mean().item()
    return result


@torch.no_grad()
def sample_gold_and_kl(
    policy, ref, tokenizer, prompts: list[str], judge, cfg: DPOConfig, device
) -> dict:
    """Gold score and k1 KL(policy || ref) in nats per sequence on fresh temperature-1 samples."""
    from ..core import response_mask_from_eos
    from ..models.generation import decode_responses, encode_prompts, sample_responses

    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    gold, kl = [], []
    for s in range(0, len(prompts), 128):
        chunk = prompts[s : s + 128]
        ids, mask, _ = encode_prompts(tokenizer, chunk, device=device)  # (b, P)
        with autocast(device):
            response = sample_responses(
                policy, ids, mask, cfg.eval_response_tokens, tokenizer.eos_token_id,
                tokenizer.pad_token_id, generator=generator,
            )  # (b, R)  # fmt: skip
        response_mask = response_mask_from_eos(response, tokenizer.eos_token_id)  # (b, R)
        full = torch.cat([ids, response], 1)  # (b, P+R)
        full_mask = torch.cat([mask, response_mask.long()], 1)  # (b, P+R)
        logps = []
        for lm in (policy, ref):
            with autocast(device):
                logits = lm(
                    input_ids=full, attention_mask=full_mask,
                    position_ids=position_ids_from_mask(full_mask), use_cache=False,
                ).logits  # (b, P+R, V)  # fmt: skip
            P = ids.shape[1]
            logps.append(logprobs_from_logits(logits[:, P - 1 : -1], response))  # (b, R)
        kl += ((logps[0] - logps[1]) * response_mask).sum(1).tolist()  # k1, summed over tokens
        texts, ended = decode_responses(tokenizer, response, tokenizer.eos_token_id)
        gold += judge.score_batch(chunk, texts, ended)
    return {"gold": sum(gold) / len(gold), "kl": sum(kl) / len(kl), "n_samples": len(gold)}


@torch.no_grad()
def held_out_samples(policy, ref, tokenizer, pairs: Pairs, cfg: DPOConfig, device) -> list[dict]:
    """A temperature-1 response of the policy and of the reference to each of the first
    `cfg.sample_prompts` held-out prompts, beside the pair's chosen response."""
    from ..models.generation import sample_texts

    prompts = list(pairs.prompts[: cfg.sample_prompts])
    rows = [{"prompt": p, "chosen": c} for p, c in zip(prompts, pairs.chosen)]
    for name, lm in (("policy", policy), ("reference", ref)):
        generator = torch.Generator(device=device).manual_seed(cfg.seed + 2)  # the same draws
        with autocast(device):
            texts, _ = sample_texts(
                lm, tokenizer, prompts, cfg.sample_tokens, generator=generator, device=device
            )
        for row, text in zip(rows, texts):
            row[name] = text
    return rows


def train_dpo(
    cfg: DPOConfig, progress: bool = True, figures: Callable[[Path], list[Path]] | None = None
) -> dict:
    """Train a policy with DPO (or IPO), evaluate it and save it to `cfg.out`; returns dpo_eval.json."""
    from ..models.loading import (
        apply_eos_option,
        check_model_dir,
        load_causal_lm,
        load_tokenizer,
        match_vocab,
        pick_device,
    )

    cfg.validate()
    device = pick_device(cfg.device)
    start = time.perf_counter()
    out = Path(cfg.out)

    # 1. Check the inputs before any work: the data file, then the model folders.
    file_pairs = read_preference_file(cfg)
    conversations = holds_conversations(file_pairs, cfg.data, cfg.model)
    for directory in (cfg.model, cfg.ref_model):
        if directory:
            check_model_dir(directory)
    if cfg.model:
        policy_dir = Path(cfg.model)
    else:
        from ..task.default import base_model_dir

        policy_dir = base_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    tokenizer = load_tokenizer(policy_dir, trust_remote_code=cfg.trust_remote_code)
    apply_eos_option(tokenizer, cfg.eos_token, policy_dir, conversations or cfg.chat_template)
    source = f"the tokenizer in {policy_dir}"
    if cfg.chat_template:
        apply_chat_template(tokenizer, [""], source)  # no template: one line, before any work
    if conversations:  # as train-reward renders them, so DPO learns on the same text
        file_pairs = render_conversation_pairs(tokenizer, file_pairs, cfg.data, source)
    policy = load_causal_lm(policy_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(policy, tokenizer, policy_dir)
    if cfg.lora_r:
        policy = apply_lora(policy, cfg, seed=cfg.seed)
    if cfg.lora_r and not cfg.ref_model:
        ref = AdaptersOff(policy)  # the reference is the base: no second copy
    else:
        ref_dir = Path(cfg.ref_model) if cfg.ref_model else policy_dir
        ref = load_causal_lm(ref_dir, trust_remote_code=cfg.trust_remote_code)
        match_vocab(ref, tokenizer, ref_dir)
        ref.requires_grad_(False)
    set_seed(cfg.seed)  # after loading: a cold cache trains the base model and draws from the RNG
    policy.to(device)
    ref.to(device)
    if cfg.compile:
        compile_forward(policy)  # a LoRA reference (the adapters off) runs through it too
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, cfg, command="dpo")

    # 2. Pairs: the user's file, or sampled from the base model and labelled by the gold judge,
    # split as `rlhf train-reward` splits them with this seed.
    pairs = preference_pairs(file_pairs, policy, tokenizer, cfg, out, progress)
    if cfg.chat_template and not conversations:  # conversations are rendered already
        pairs.prompts = apply_chat_template(tokenizer, pairs.prompts, source)
    eval_pairs, train_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.data)
    pad = tokenizer.pad_token_id
    chosen, rejected, n_cut = encode_pairs(tokenizer, train_pairs, cfg.max_length)
    eval_chosen, eval_rejected, _ = encode_pairs(tokenizer, eval_pairs, cfg.max_length)
    if n_cut:
        print(
            f"warning: cut {n_cut} sequences longer than --max-length {cfg.max_length} tokens from the left"
        )

    # 3. Reference log-probs, once; the held-out accuracy before training.
    ref_logps = batched_logps(ref, chosen, rejected, pad, device, cfg.batch_size)  # (B, 2)
    eval_ref_logps = batched_logps(
        ref, eval_chosen, eval_rejected, pad, device, cfg.batch_size
    )  # (B, 2)
    result = {
        "before": implicit_reward_eval(
            policy, eval_chosen, eval_rejected, eval_ref_logps, eval_pairs, cfg, pad, device
        )
    }

    # 4. DPO: AdamW, linear decay, gradient clipping. The model's own dropout stays off (as
    # loaded); --lora-dropout acts on the adapters' input during the training steps only.
    total_steps = cfg.epochs * math.ceil(len(chosen) / cfg.batch_size)
    dpo_step = DPOStep(policy, cfg.lr, total_steps, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total=total_steps, desc=f"DPO (beta {cfg.beta:g})", disable=not progress)
    step = 0
    with RunLogger(out, **tracking(cfg, figures)) as logger:
        before = result["before"]
        logger.log(0, {"dpo/eval_accuracy": before["accuracy"], "dpo/eval_loss": before["loss"]})
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(chosen), generator=generator).tolist()
            for s in range(0, len(perm), cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                (loss, r_c, r_r), _ = dpo_step.run(
                    [chosen[i] for i in idx], [rejected[i] for i in idx], ref_logps[idx], pad
                )
                step += 1
                metrics = {
                    "dpo/loss": loss.item(),
                    "dpo/accuracy": (r_c > r_r).float().mean().item(),
                    "dpo/margin": (r_c - r_r).mean().item(),
                    "dpo/chosen_reward": r_c.mean().item(),
                    "dpo/rejected_reward": r_r.mean().item(),
                    "dpo/lr": dpo_step.scheduler.get_last_lr()[0],
                    "dpo/epoch": epoch + s / len(perm),
                }
                logger.log(step, metrics)
                bar.update()
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", acc=f"{metrics['dpo/accuracy']:.2f}", refresh=False
                )
        bar.close()

        # 5. Held-out accuracy after training; gold and KL on fresh samples (--eval-split prompts).
        result["after"] = implicit_reward_eval(
            policy, eval_chosen, eval_rejected, eval_ref_logps, eval_pairs, cfg, pad, device
        )
        after = {
            "dpo/eval_accuracy": result["after"]["accuracy"],
            "dpo/eval_loss": result["after"]["loss"],
        }
        logger.log(step, after)
        if (cfg.gold if cfg.gold is not None else cfg.data is None) and cfg.eval_samples:
            from ..task import corpus
            from ..task.gold import GoldJudge

            prompts = corpus.prompts(cfg.eval_samples, seed=cfg.seed, split=cfg.eval_split)
            judge = GoldJudge()
            for name, lm in (("reference", ref), ("policy", policy)):
                result[name] = sample_gold_and_kl(lm, ref, tokenizer, prompts, judge, cfg, device)
            gold, kl = result["policy"]["gold"], result["policy"]["kl"]
            logger.log(step, {"objective/gold": gold, "objective/kl": kl})

    if cfg.sample_prompts:
        write_jsonl(
            out / "samples.jsonl", held_out_samples(policy, ref, tokenizer, eval_pairs, cfg, device)
        )
    merged = out / "policy-merged" if cfg.merge_lora else None
    with quiet_transformers_bars():
        save_lm(policy, tokenizer, out / "policy", merged=merged)
    result["n_train_pairs"] = len(train_pairs)
    result["steps"] = step
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "dpo_eval.json", result)
    return result
