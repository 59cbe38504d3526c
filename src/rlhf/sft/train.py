"""`rlhf sft`: supervised fine-tuning, the first stage of the pipeline (InstructGPT: SFT, then the
reward model, then PPO). The model learns to continue each prompt with its completion by
next-token cross-entropy, on the completion's tokens only by default.

Shapes: B examples, T tokens, V vocabulary.

A text example is encoded as the other stages encode a prompt and its response: prompt +
completion (joined as `reward.loss.join_text` joins them) + EOS, so the model learns to end where
PPO's sampling stops and the reward model reads its score. The prompt's tokens are the longest
common prefix of the row and the prompt's own tokens, so a BPE merge across the boundary counts
as completion (as in `rl.dpo.encode_pairs`). A conversation is rendered whole by the chat
template; a trained turn's tokens run from the end of the conversation before it, as rendered for
a reply (with the generation prompt), to the end of that turn as rendered, its end-of-turn marker
included.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core import logprobs_from_logits
from ..data import atomic_write_json, write_jsonl
from ..data.sft_records import SFTExample, read_sft_examples
from ..errors import ConfigError, InputError
from ..models.forward import autocast, position_ids_from_mask
from ..models.generation import apply_chat_template, need_chat_template, pad_right, render_messages
from ..models.lora import adapter_dropout, apply_lora
from ..models.policy import save_lm
from ..reward.loss import join_text
from ..reward.preferences import held_out_size
from ..tracking import (
    RunLogger,
    progress_bar,
    quiet_transformers_bars,
    save_config,
    set_seed,
    tracking,
)
from .config import SFTConfig

Row = tuple[list[int], list[int]]
"""(token ids, loss mask): 1 where the token is predicted and trained on"""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _tokens_before(tokenizer, text: str, ids: list[int], chars: int) -> int:
    """How many of `text`'s tokens `ids` lie wholly inside its first `chars` characters."""
    return _common_prefix(ids, tokenizer(text[:chars])["input_ids"]) if chars else 0


def encode_text(tokenizer, prompt: str, completion: str, completion_only: bool) -> Row:
    """prompt + completion + EOS, with the completion's tokens (and EOS) marked."""
    ids = tokenizer(join_text(prompt, completion))["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = _common_prefix(ids, tokenizer(prompt)["input_ids"]) if completion_only else 0
    n_context = max(1, n_prompt)  # position 0 predicts nothing
    return ids, [0] * n_context + [1] * (len(ids) - n_context)


def encode_conversation(
    tokenizer, messages: list, trained: tuple[int, ...], completion_only: bool, where: str
) -> Row:
    """The rendered conversation, with the tokens of the `trained` turns marked."""
    full = render_messages(tokenizer, messages, where)
    ids = tokenizer(full)["input_ids"]
    if not completion_only:
        return ids, [0] + [1] * (len(ids) - 1)
    mask = [0] * len(ids)
    for i in trained:
        before = render_messages(tokenizer, messages[:i], where, generation_prompt=True)
        through = render_messages(tokenizer, messages[: i + 1], where)
        start = _tokens_before(tokenizer, full, ids, len(os.path.commonprefix([full, before])))
        end = _tokens_before(tokenizer, full, ids, len(os.path.commonprefix([full, through])))
        for t in range(max(start, 1), end):
            mask[t] = 1
    return ids, mask


def encode_examples(
    tokenizer, examples: list[SFTExample], cfg: SFTConfig, max_length: int
) -> tuple[list[Row], int]:
    """Every example as a row, cut to `max_length` tokens from the end; returns (rows, rows cut)."""
    rows, cut = [], 0
    for ex in examples:
        if ex.is_conversation:
            row = encode_conversation(
                tokenizer, list(ex.messages), ex.trained, cfg.completion_only_loss, ex.source
            )
        else:
            prompt = ex.prompt
            if cfg.chat_template and ex.form == "prompt-completion":
                (prompt,) = apply_chat_template(
                    tokenizer, [prompt], f"the tokenizer of {cfg.model}"
                )
            row = encode_text(tokenizer, prompt, ex.completion, cfg.completion_only_loss)
        if len(row[0]) > max_length:
            cut += 1
            row = (row[0][:max_length], row[1][:max_length])
        rows.append(row)
    return rows, cut


def token_losses(lm, rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the marked tokens, and the number right under argmax: (), ()."""
    ids, attention = pad_right([r[0] for r in rows], pad_id, device)  # (B, T)
    mask, _ = pad_right([r[1] for r in rows], 0, device)  # (B, T)
    with autocast(ids.device):
        logits = lm(
            input_ids=ids, attention_mask=attention,
            position_ids=position_ids_from_mask(attention), use_cache=False,
        ).logits  # (B, T, V)  # fmt: skip
    keep = mask[:, 1:].bool()  # (B, T-1): token t+1, predicted at t
    logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # (B, T-1)
    nll = -torch.where(keep, logp, torch.zeros_like(logp)).sum()
    right = ((logits[:, :-1].argmax(-1) == ids[:, 1:]) & keep).sum()
    return nll, right


@torch.no_grad()
def held_out_loss(lm, rows: list[Row], pad_id: int, device, batch_size: int) -> dict:
    """Mean NLL per trained token over `rows`, its perplexity, and the token accuracy."""
    total, right, tokens = 0.0, 0, sum(sum(r[1][1:]) for r in rows)
    for s in range(0, len(rows), batch_size):
        nll, ok = token_losses(lm, rows[s : s + batch_size], pad_id, device)
        total, right = total + nll.item(), right + ok.item()
    loss = total / max(tokens, 1)
    return {
        "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": right / max(tokens, 1), "tokens": tokens, "examples": len(rows),
    }  # fmt: skip


def split_examples(n: int, eval_fraction: float, seed: int, source) -> tuple[list[int], list[int]]:
    """(held-out, training) indices: a seeded shuffle, at least one of each."""
    n_eval = held_out_size(n, eval_fraction, source, noun="example")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:n_eval], order[n_eval:]


def _sample_prompt(tokenizer, ex: SFTExample, cfg: SFTConfig) -> tuple[str, str] | None:
    """(prompt text to sample from, the data's completion) for samples.jsonl; None for text."""
    if ex.form == "text":
        return None
    if ex.is_conversation:
        first = ex.trained[0] if ex.trained else len(ex.messages)
        if first == 0:
            return None
        prompt = render_messages(tokenizer, list(ex.messages[:first]), ex.source, True)
        return prompt, ex.messages[first]["content"] if first < len(ex.messages) else ""
    prompt = ex.prompt
    if cfg.chat_template:
        (prompt,) = apply_chat_template(tokenizer, [prompt])
    return prompt, ex.completion


def sample_completions(lm, tokenizer, examples: list[SFTExample], cfg: SFTConfig, device) -> list:
    """One completion for each of the first `cfg.sample_prompts` held-out prompts, at temperature 1."""
    from ..models.generation import sample_texts

    chosen = [p for ex in examples if (p := _sample_prompt(tokenizer, ex, cfg))]
    chosen = chosen[: cfg.sample_prompts]
    if not chosen:
        return []
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    with autocast(device):
        texts, ended = sample_texts(
            lm, tokenizer, [p for p, _ in chosen], cfg.sample_tokens, generator=generator,
            device=device,
        )  # fmt: skip
    return [
        {"prompt": p, "completion": text, "ended": e, "data_completion": ref}
        for (p, ref), text, e in zip(chosen, texts, ended)
    ]


def _resolve_max_length(cfg: SFTConfig, model_dir: Path) -> int:
    from ..models.loading import position_limit

    limit = position_limit(model_dir)
    if cfg.max_length is not None and limit is not None and cfg.max_length > limit:
        raise ConfigError(
            f"--max-length {cfg.max_length} exceeds the {limit} positions of the model in "
            f"{model_dir}; use --max-length {limit} or less"
        )
    return cfg.max_length or min(1024, limit or 1024)


def train_sft(
    cfg: SFTConfig, progress: bool = True, figures: Callable[[Path], list[Path]] | None = None
) -> dict:
    """Fine-tune a causal LM on `cfg.data`, evaluate it on held-out examples and save it to
    `cfg.out`/model; returns what sft_eval.json holds."""
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

    # 1. Check the inputs before any work: the data file, then the model folder.
    examples = read_sft_examples(
        cfg.data, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
        completion_field=cfg.completion_field, messages_field=cfg.messages_field,
        completion_only=cfg.completion_only_loss,
    )  # fmt: skip
    eval_idx, train_idx = split_examples(len(examples), cfg.eval_fraction, cfg.seed, cfg.data)
    conversations = examples[0].is_conversation
    if conversations and not cfg.model:
        raise InputError(
            f"{cfg.data}: holds conversations (lists of messages), which are rendered with a chat "
            "template, and the built-in model has none; give a chat model's folder with --model"
        )
    if cfg.model:
        model_dir = check_model_dir(cfg.model)
    else:
        from ..task.default import base_model_dir

        model_dir = base_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    max_length = _resolve_max_length(cfg, model_dir)
    cfg = dataclasses.replace(cfg, lr=cfg.resolved_lr(), max_length=max_length)  # saved resolved
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    apply_eos_option(tokenizer, cfg.eos_token, model_dir, conversations or cfg.chat_template)
    source = f"the tokenizer in {model_dir}"
    if conversations:
        need_chat_template(tokenizer, cfg.data, source)
    elif cfg.chat_template:
        apply_chat_template(tokenizer, [""], source)  # no template: one line, before any work
    rows, n_cut = encode_examples(tokenizer, examples, cfg, max_length)
    train_rows = [rows[i] for i in train_idx]
    eval_rows = [rows[i] for i in eval_idx]
    if n_cut:
        print(
            f"warning: cut {n_cut} examples longer than --max-length {max_length} tokens at the end"
        )
    empty = sum(1 for r in train_rows if not any(r[1][1:]))
    if empty == len(train_rows):
        raise InputError(
            f"{cfg.data}: no training example has a completion token left to learn from"
            + (f" within --max-length {max_length}" if n_cut else "")
        )
    if empty:
        print(f"warning: {empty} training examples have no completion token and train nothing")

    lm = load_causal_lm(model_dir, trust_remote_code=cfg.trust_remote_code)
    match_vocab(lm, tokenizer, model_dir)
    if cfg.lora_r:
        lm = apply_lora(lm, cfg, seed=cfg.seed)
    set_seed(cfg.seed)  # after loading: a cold cache trains the base model and draws from the RNG
    lm.to(device)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, cfg, command="sft")

    # 2. Held-out loss before; AdamW with linear decay and clipping, as TRL's defaults. The
    # model's own dropout stays off (as loaded); --lora-dropout acts on the adapters only.
    pad = tokenizer.pad_token_id
    micro = cfg.micro_batch_size or cfg.batch_size
    result = {"before": held_out_loss(lm, eval_rows, pad, device, micro)}
    trained = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total=total_steps, desc="SFT", disable=not progress)
    step = 0
    with RunLogger(out, **tracking(cfg, figures)) as logger:
        before = result["before"]
        logger.log(
            0,
            {"sft/eval_loss": before["loss"], "sft/eval_token_accuracy": before["token_accuracy"]},
        )
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(train_rows), generator=generator).tolist()
            for s in range(0, len(perm), cfg.batch_size):
                batch = [train_rows[i] for i in perm[s : s + cfg.batch_size]]
                # The mean over the whole batch's trained tokens, whatever the micro-batches.
                tokens = max(sum(sum(r[1][1:]) for r in batch), 1)
                optimizer.zero_grad(set_to_none=True)
                nll_sum, right = 0.0, 0
                adapter_dropout(lm, True)
                try:
                    for m in range(0, len(batch), micro):
                        nll, ok = token_losses(lm, batch[m : m + micro], pad, device)
                        (nll / tokens).backward()
                        nll_sum, right = nll_sum + nll.item(), right + ok.item()
                finally:
                    adapter_dropout(lm, False)
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                metrics = {
                    "sft/loss": nll_sum / tokens,
                    "sft/token_accuracy": right / tokens,
                    "sft/tokens": float(tokens),
                    "sft/grad_norm": grad_norm.item(),
                    "sft/lr": scheduler.get_last_lr()[0],
                    "sft/epoch": epoch + (s + len(batch)) / len(perm),
                }
                logger.log(step, metrics)
                bar.update()
                bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}", refresh=False)
            held = held_out_loss(lm, eval_rows, pad, device, micro)
            logger.log(
                step,
                {"sft/eval_loss": held["loss"], "sft/eval_token_accuracy": held["token_accuracy"]},
            )
        bar.close()
    result["after"] = held

    # 3. Samples on held-out prompts, then the model: a LoRA run writes its adapter and the
    # adapter merged into the base, so that every later stage can take model/ as --model.
    if cfg.sample_prompts:
        write_jsonl(
            out / "samples.jsonl",
            sample_completions(lm, tokenizer, [examples[i] for i in eval_idx], cfg, device),
        )
    with quiet_transformers_bars():
        if cfg.lora_r:
            save_lm(lm, tokenizer, out / "adapter", merged=out / "model")
        else:
            save_lm(lm, tokenizer, out / "model")
    result.update(
        n_train=len(train_rows), n_eval=len(eval_rows), steps=step, lr=cfg.lr,
        form=examples[0].form, seconds=round(time.perf_counter() - start, 1),
    )  # fmt: skip
    atomic_write_json(out / "sft_eval.json", result)
    return result
