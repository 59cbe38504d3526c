"""The embedded default task's models: a BPE tokenizer and a small GPT-2 pretrained on the corpus.

Shapes: B batch, T tokens, V vocabulary.

Both are built on first use (about a minute on 2 CPU cores) and cached in a folder whose name is a
hash of everything that changes the result, so later runs load them in a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
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
from . import corpus
from .tokenizer import train_tokenizer


@dataclass
class BaseModelConfig:
    """How the default task's tokenizer and base (SFT) model are built."""

    n_reviews: int = 30000
    """generated reviews to pretrain on (plus 1,000 held out for perplexity)"""
    vocab_size: int = 1024
    """byte-level BPE vocabulary size, special tokens included"""
    n_layer: int = 4
    """transformer blocks"""
    n_embd: int = 128
    """hidden size"""
    n_head: int = 4
    """attention heads"""
    n_positions: int = 128
    """longest sequence, prompt and response together"""
    steps: int = 400
    """optimizer steps"""
    batch_size: int = 64
    """reviews per step"""
    lr: float = 3e-3
    """peak AdamW learning rate (linear warm-up, cosine decay to a tenth)"""
    seed: int = 0
    """seed for the corpus, the batches and the initial weights"""


def default_cache_dir(override: str | Path | None = None) -> Path:
    """`override`, else $RLHF_CACHE_DIR, else $XDG_CACHE_HOME/rlhf, else ~/.cache/rlhf."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("RLHF_CACHE_DIR"):
        return Path(os.environ["RLHF_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlhf"


def cache_key(kind: str, payload: dict) -> str:
    """A short hash of everything that changes a cached artefact, libraries included."""
    import tokenizers
    import transformers

    full = {
        "kind": kind,
        "corpus_version": corpus.CORPUS_VERSION,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        **payload,
    }
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()
    return f"{kind}-{digest[:12]}"


def _batches(rows: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator):
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[i] for i in order[start : start + batch_size]]
            yield pad_right(chunk, pad_id)


def _lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over real tokens and the number of predicted tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, (targets != -100).sum()


def pretrain_base_model(cfg: BaseModelConfig, progress: bool = True):
    """Generate the corpus, train the tokenizer, pretrain the GPT-2; returns (model, tokenizer, info)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..models.generation import sample_texts
    from ..tracking import progress_bar

    start = time.perf_counter()
    reviews = corpus.generate_reviews(cfg.n_reviews + 1000, seed=cfg.seed)
    train_texts = [r.text for r in reviews[: cfg.n_reviews]]
    heldout_texts = [r.text for r in reviews[cfg.n_reviews :]]
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    eos = tokenizer.eos_token_id
    encode = lambda texts: [ids + [eos] for ids in tokenizer(texts)["input_ids"]]  # noqa: E731
    train_rows, heldout_rows = encode(train_texts), encode(heldout_texts)
    too_long = max(len(r) for r in train_rows + heldout_rows)
    if too_long > cfg.n_positions:
        raise ValueError(f"a review has {too_long} tokens, more than n_positions={cfg.n_positions}")

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    swap_slow_gelu(model)  # one kernel instead of four; the saved config still says gelu_new
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(train_rows, cfg.batch_size, tokenizer.pad_token_id, generator)
    model.train()
    bar = None
    for _ in range(cfg.steps):
        ids, mask = next(batches)
        loss_sum, n = _lm_loss(model, ids, mask)
        loss = loss_sum / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if bar is None:
            # The bar starts after the first step, which it counts but does not time. The first
            # step of a fresh process is the slowest (its one-off costs: first allocations, kernel
            # set-up, code paged in from disk), and tqdm's first ETA is (steps - 1) times that
            # one step: it read 13 minutes for a one-minute job.
            bar = progress_bar(
                total=cfg.steps, initial=1, desc="pretrain base model", disable=not progress,
                leave=False,
            )  # fmt: skip
        else:
            bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    train_seconds = time.perf_counter() - start

    with torch.no_grad():
        total, count = 0.0, 0
        for s in range(0, len(heldout_rows), 250):
            ids, mask = pad_right(heldout_rows[s : s + 250], tokenizer.pad_token_id)
            loss_sum, n = _lm_loss(model, ids, mask)
            total, count = total + loss_sum.item(), count + n.item()
    sample_prompts = corpus.prompts(5, seed=cfg.seed, split="eval")
    texts, _ = sample_texts(
        model, tokenizer, sample_prompts, 40, generator=torch.Generator().manual_seed(cfg.seed)
    )
    info = {
        "heldout_perplexity": math.exp(total / count),
        "train_seconds": round(train_seconds, 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "samples": [f"{p} {t}" for p, t in zip(sample_prompts, texts)],
        "config": dataclasses.asdict(cfg),
    }
    return model, tokenizer, info


def base_model_dir(
    cfg: BaseModelConfig | None = None, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """The cached base model folder for `cfg`, building it first if it is not there."""
    cfg = cfg or BaseModelConfig()
    root = default_cache_dir(cache_dir)
    target = root / cache_key("base", dataclasses.asdict(cfg))
    if (target / "base_info.json").is_file():
        return target
    model, tokenizer, info = pretrain_base_model(cfg, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so an interrupted build never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
    try:
        with quiet_transformers_bars():
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "base_info.json", info)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def base_model_info(directory: Path) -> dict:
    return json.loads((Path(directory) / "base_info.json").read_text())
