"""The arithmetic task's base model: a byte-level tokenizer and a small GPT-2 taught to answer.

Shapes: B batch, T tokens, V vocabulary.

Each training sequence is BOS, the problem, its answer (sometimes hedged, see `task.arithmetic`)
and EOS; the loss counts the answer and EOS tokens only (the operands are random, there is nothing
to learn in them). The tokenizer is the built-in task's byte-level BPE with no merges (its 256-byte
alphabet and the two special tokens), so every digit is a token of its own. Built on first use and
cached like the review task's base model (`task.default`): a folder named by a hash of the config,
written to a temporary folder and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import atomic_write_json
from ..models.forward import swap_slow_gelu
from ..models.generation import pad_right
from ..tracking import quiet_transformers_bars
from . import arithmetic
from .default import cache_key, default_cache_dir
from .tokenizer import train_tokenizer

INFO_FILE = "arithmetic_info.json"
BYTE_VOCAB = 258  # the byte alphabet and BOS/EOS, PAD: a vocabulary this size learns no merges


@dataclass
class ArithmeticModelConfig:
    """How the arithmetic task's base model is built."""

    n_examples: int = 100_000
    """pretraining problems drawn (with replacement) from the training split"""
    hedge_rate: float = 0.2
    """share of pretraining answers written as several nearby numbers, the right one among them"""
    n_layer: int = 4
    """transformer blocks"""
    n_embd: int = 128
    """hidden size"""
    n_head: int = 4
    """attention heads"""
    n_positions: int = 64
    """longest sequence, prompt and response together"""
    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 64
    """problems per step"""
    lr: float = 3e-3
    """peak AdamW learning rate (linear warm-up, cosine decay to a tenth)"""
    seed: int = 0
    """seed for the examples, the batches and the initial weights"""
    eval_prompts: int = 256
    """held-out problems the saved accuracies are measured on"""


def _encode(tokenizer, examples: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token rows BOS + prompt + answer + EOS, with the number of tokens before the answer."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    answers = tokenizer([a for _, a in examples], add_special_tokens=False)["input_ids"]
    return [(p + a + [eos], len(p)) for p, a in zip(prompts, answers, strict=True)]


def _answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor):
    """Mean next-token loss over the answer and EOS tokens (not the prompt, not padding)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    position = torch.arange(1, ids.shape[1])[None, :]  # (1, T-1), the target's position
    keep = (mask[:, 1:] == 1) & (position >= starts[:, None])  # (B, T-1)
    targets = targets.masked_fill(~keep, -100)  # (B, T-1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def evaluate(model, tokenizer, n: int = 256, temperature: float = 1.0, seed: int = 0) -> dict:
    """Strict and lenient accuracy on `n` held-out problems, with this project's sampler.

    `temperature=0` is greedy (argmax), done as a very low temperature.
    """
    from ..models.generation import sample_texts

    records = arithmetic.arithmetic_prompts(n, seed=seed, split="eval")
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    texts, ended = sample_texts(
        model, tokenizer, prompts, 16, temperature=max(temperature, 1e-4),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    counts = [len(arithmetic.numbers_in(t)) for t in texts]
    return {
        "strict": arithmetic.strict_accuracy(texts, answers),
        "lenient": arithmetic.lenient_accuracy(texts, answers),
        "ended": sum(ended) / len(ended),
        "numbers_per_answer": sum(counts) / len(counts),
        "several_numbers": sum(c > 1 for c in counts) / len(counts),
    }


def pretrain_arithmetic_model(cfg: ArithmeticModelConfig, progress: bool = True):
    """Pretrain the GPT-2 on problems and answers; returns (model, tokenizer, info)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..tracking import progress_bar

    start = time.perf_counter()
    examples = arithmetic.pretraining_examples(cfg.n_examples, cfg.seed, cfg.hedge_rate)
    tokenizer = train_tokenizer([p + a for p, a in examples[:2000]], BYTE_VOCAB)
    rows = _encode(tokenizer, examples)
    too_long = max(len(r) for r, _ in rows) + 16  # room for a response longer than any seen
    if too_long > cfg.n_positions:
        raise ValueError(f"n_positions={cfg.n_positions} is too short; need {too_long}")

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    swap_slow_gelu(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = None
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = torch.randperm(len(rows), generator=generator).tolist()
        chunk, order = order[: cfg.batch_size], order[cfg.batch_size :]
        ids, mask = pad_right([rows[i][0] for i in chunk], tokenizer.pad_token_id)  # (B, T)
        starts = torch.tensor([rows[i][1] for i in chunk])  # (B,)
        loss = _answer_loss(model, ids, mask, starts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if bar is None:  # started after the first, slowest step, as in task.default
            bar = progress_bar(
                total=cfg.steps, initial=1, desc="pretrain arithmetic model",
                disable=not progress, leave=False,
            )  # fmt: skip
        else:
            bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    train_seconds = time.perf_counter() - start

    sampled = evaluate(model, tokenizer, cfg.eval_prompts, temperature=1.0, seed=cfg.seed)
    greedy = evaluate(model, tokenizer, cfg.eval_prompts, temperature=0.0, seed=cfg.seed)
    info = {
        "task": "arithmetic",
        "arithmetic_version": arithmetic.ARITHMETIC_VERSION,
        "heldout_strict_accuracy": sampled["strict"],
        "heldout_lenient_accuracy": sampled["lenient"],
        "heldout_strict_accuracy_greedy": greedy["strict"],
        "heldout_lenient_accuracy_greedy": greedy["lenient"],
        "heldout_eos_rate": sampled["ended"],
        "heldout_several_numbers": sampled["several_numbers"],
        "eval_prompts": cfg.eval_prompts,
        "train_seconds": round(train_seconds, 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "config": dataclasses.asdict(cfg),
    }
    return model, tokenizer, info


def arithmetic_model_dir(
    cache_dir: str | Path | None = None,
    progress: bool = True,
    config: ArithmeticModelConfig | None = None,
) -> Path:
    """The cached arithmetic base model folder for `config`, pretraining it first if absent."""
    cfg = config or ArithmeticModelConfig()
    root = default_cache_dir(cache_dir)
    payload = {"arithmetic_version": arithmetic.ARITHMETIC_VERSION, **dataclasses.asdict(cfg)}
    target = root / cache_key("arithmetic", payload)
    if (target / INFO_FILE).is_file():
        return target
    model, tokenizer, info = pretrain_arithmetic_model(cfg, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so an interrupted build never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=".arithmetic-", dir=root))
    try:
        with quiet_transformers_bars():
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / INFO_FILE, info)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def arithmetic_model_info(directory: str | Path) -> dict:
    """The metadata saved beside the model: held-out accuracies, pretraining seconds, config."""
    return json.loads((Path(directory) / INFO_FILE).read_text())
