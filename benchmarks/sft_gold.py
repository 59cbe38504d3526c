"""The gold score of the built-in base model before and after `rlhf sft`: what SFT on a few
positive demonstrations does to the policy PPO would start from.

    rlhf sft --data docs/examples/sft-reviews.jsonl --lr 1e-4 --out runs/sft
    python benchmarks/sft_gold.py runs/sft/model

Samples 24-token responses (temperature 1, one seed) to 512 openings of the held-out split and
scores them with the gold judge.
"""

from __future__ import annotations

import sys

import torch

from rlhf.models.generation import sample_texts
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.task import corpus
from rlhf.task.default import base_model_dir
from rlhf.task.gold import GoldJudge


def main() -> None:
    prompts = corpus.prompts(512, seed=7, split="eval")
    judge = GoldJudge()
    for name, folder in (("base", base_model_dir()), ("sft", sys.argv[1])):
        lm, tok = load_causal_lm(folder), load_tokenizer(folder)
        texts, ended = sample_texts(
            lm, tok, prompts, 24, generator=torch.Generator().manual_seed(3)
        )
        gold = judge.score_batch(prompts, texts, ended)
        print(f"{name:5s} gold {sum(gold) / len(gold):.3f} ({folder})")


if __name__ == "__main__":
    main()
