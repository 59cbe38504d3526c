"""Preference data (the seed's task 1): pairs of responses to one prompt, and which one won.

`create_preference_dataset` samples two responses per prompt from the base model and lets the gold
judge choose, through Bradley-Terry sampling (P(A preferred) = sigmoid((gold_A - gold_B) / t)) to
imitate human disagreement, or deterministically with t = 0. `Pairs` holds the pairs as
chosen/rejected lists for training, from generated records or from a preference file, and
`label_ceiling` measures how often the sampled labels agree with the gold ordering.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import PreferencePair, read_preferences
from ..errors import ConfigError, InputError
from ..tracking import progress_bar, quiet_transformers_bars

SAMPLE_BATCH = 256  # texts per sampling call (two per pair)


def default_task(cache_dir=None, progress=True):
    from ..models.loading import load_causal_lm, load_tokenizer
    from ..task.default import base_model_dir

    directory = base_model_dir(cache_dir=cache_dir, progress=progress)
    with quiet_transformers_bars():
        return load_causal_lm(directory), load_tokenizer(directory), directory


def create_preference_dataset(
    model=None,
    tokenizer=None,
    prompts: Sequence[str] | None = None,
    n_pairs: int = 2000,
    judge=None,
    label_temperature: float = 0.05,
    response_tokens: int = 40,
    seed: int = 0,
    cache_dir=None,
    progress: bool = True,
) -> list[dict]:
    """Two sampled responses per prompt, labelled by the gold judge.

    With no arguments it uses the built-in task: its base model, its training prompts and its gold
    judge. Records follow the seed's format, `{"prompt", "response_A", "response_B", "preference"}`,
    plus the judge's scores `gold_A` and `gold_B` (which readers ignore) for evaluation.
    `label_temperature=0` labels deterministically (ties go to A).
    """
    from ..models.forward import device_of
    from ..models.generation import sample_texts
    from ..task import corpus
    from ..task.gold import GoldJudge

    if model is None or tokenizer is None:
        model, tokenizer, _ = default_task(cache_dir, progress)
    judge = judge or GoldJudge()
    if prompts is None:
        # 10% spare: pairs with two identical (or empty) responses carry no preference and are dropped.
        prompts = corpus.prompts(n_pairs + n_pairs // 10 + 8, seed=seed, split="train")
    prompts = list(prompts)
    device = device_of(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    doubled = [p for p in prompts for _ in range(2)]
    texts, ended, gold = [], [], []
    bar = progress_bar(
        total=len(prompts), unit="prompt",
        # More prompts than pairs: the spare covers pairs dropped for two identical responses.
        desc=f"sample and label pairs ({len(prompts):,} prompts for {n_pairs:,} pairs)",
        disable=not progress, leave=False,
    )  # fmt: skip
    # Chunks of SAMPLE_BATCH texts, the batch size `sample_texts` uses itself, so the samples are
    # the same as from one call; the bar moves once per chunk.
    for start in range(0, len(doubled), SAMPLE_BATCH):
        chunk = doubled[start : start + SAMPLE_BATCH]
        t, e = sample_texts(
            model, tokenizer, chunk, response_tokens, batch_size=SAMPLE_BATCH,
            generator=generator, device=device,
        )  # fmt: skip
        texts += t
        ended += e
        gold += judge.score_batch(chunk, t, e)
        bar.update(len(chunk) // 2)
    bar.close()
    rng = random.Random(seed)
    records = []
    for i, prompt in enumerate(prompts):
        a, b = 2 * i, 2 * i + 1
        if len(records) == n_pairs:
            break
        if texts[a] == texts[b] or not texts[a].strip() or not texts[b].strip():
            continue
        diff = gold[a] - gold[b]
        if label_temperature == 0:
            prefer_a = diff >= 0
        else:
            prefer_a = rng.random() < 1.0 / (
                1.0 + math.exp(-max(min(diff / label_temperature, 50), -50))
            )
        records.append(
            {
                "prompt": prompt,
                "response_A": texts[a],
                "response_B": texts[b],
                "preference": "A" if prefer_a else "B",
                "gold_A": round(gold[a], 6),
                "gold_B": round(gold[b], 6),
            }
        )
    return records


@dataclass
class Pairs:
    """Preference pairs as parallel lists; `gold_*` is None when the data has no gold judge."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    margins: list[float | None]
    gold_chosen: list[float] | None = None
    gold_rejected: list[float] | None = None

    def subset(self, index: list[int]) -> Pairs:
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return Pairs(
            pick(self.prompts), pick(self.chosen), pick(self.rejected), pick(self.margins),
            pick(self.gold_chosen), pick(self.gold_rejected),
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.prompts)


def pairs_from_records(records: list[dict]) -> Pairs:
    pairs = Pairs([], [], [], [], [], [])
    for r in records:
        a_wins = r["preference"] == "A"
        pairs.prompts.append(r["prompt"])
        pairs.chosen.append(r["response_A"] if a_wins else r["response_B"])
        pairs.rejected.append(r["response_B"] if a_wins else r["response_A"])
        pairs.margins.append(None)
        pairs.gold_chosen.append(r["gold_A"] if a_wins else r["gold_B"])
        pairs.gold_rejected.append(r["gold_B"] if a_wins else r["gold_A"])
    return pairs


def pairs_from_file(items: list[PreferencePair]) -> Pairs:
    return Pairs(
        [p.prompt for p in items], [p.chosen for p in items], [p.rejected for p in items],
        [p.margin for p in items],
    )  # fmt: skip


def label_ceiling(pairs: Pairs) -> float | None:
    """How often the (sampled) labels agree with the gold ordering, over pairs whose gold differs."""
    if pairs.gold_chosen is None:
        return None
    decided = [(c, r) for c, r in zip(pairs.gold_chosen, pairs.gold_rejected) if c != r]
    return sum(c > r for c, r in decided) / max(1, len(decided))


def holds_conversations(file_pairs: list[PreferencePair] | None, data, model) -> bool:
    """Whether the pairs read from `data` are conversations; they need a `model` folder whose
    tokenizer has the chat template that renders them (the built-in model has none)."""
    conversations = file_pairs is not None and file_pairs[0].is_conversation
    if conversations and not model:
        raise InputError(
            f"{data}: holds conversations (lists of messages), which are rendered with a chat "
            "template, and the built-in model has none; give a chat model's folder with --model"
        )
    return conversations


def held_out_size(n_pairs: int, eval_fraction: float, source, noun: str = "pair") -> int:
    """Held-out records out of `n_pairs`; at least one each for training and evaluation."""
    n_eval = max(1, int(round(eval_fraction * n_pairs)))
    if n_pairs - n_eval < 1:
        raise ConfigError(
            f"{source}: only {n_pairs} {noun}(s), and the held-out split (--eval-fraction "
            f"{eval_fraction}) leaves none for training; give at least 2 {noun}s"
        )
    return n_eval


def read_preference_file(cfg) -> list[PreferencePair] | None:
    """The pairs of `cfg.data` under the names `cfg` gives its fields, checked to leave pairs for
    both sides of the held-out split; None without --data (the built-in task's are generated)."""
    if not cfg.data:
        return None
    pairs = read_preferences(
        cfg.data, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
        rejected_field=cfg.rejected_field,
    )  # fmt: skip
    held_out_size(len(pairs), cfg.eval_fraction, cfg.data)
    return pairs


def split_pairs(pairs: Pairs, eval_fraction: float, seed: int, source) -> tuple[Pairs, Pairs]:
    """(held-out, training) pairs: a seeded shuffle, so `train-reward` and `dpo` with the same seed
    hold out the same pairs."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = held_out_size(len(pairs), eval_fraction, source)
    return pairs.subset(order[:n_eval]), pairs.subset(order[n_eval:])


def preference_pairs(
    file_pairs: list[PreferencePair] | None, lm, tokenizer, cfg, out: Path, progress: bool
) -> Pairs:
    """The user's pairs, or (with none) pairs sampled from `lm` and labelled by the gold judge as
    `cfg` (n_pairs, label_temperature, response_tokens, seed) says, written to
    out/preferences.jsonl."""
    if file_pairs is not None:
        return pairs_from_file(file_pairs)
    from ..data import write_preferences

    records = create_preference_dataset(
        lm, tokenizer, n_pairs=cfg.n_pairs, label_temperature=cfg.label_temperature,
        response_tokens=cfg.response_tokens, seed=cfg.seed, progress=progress,
    )  # fmt: skip
    write_preferences(Path(out) / "preferences.jsonl", records)
    return pairs_from_records(records)
