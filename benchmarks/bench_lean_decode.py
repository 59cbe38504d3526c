"""Seconds per sampling pass: the lean decode step (`rlhf.models.lean_decode`) against the model's
own forward at every token, in the same process, alternating call by call.

    python benchmarks/bench_lean_decode.py [--rounds 10] [--models gpt2-4x128,llama-4x192,llama-8x384]
        [--responses 24,64] [--rows 64] [--threads 2]

Each model is random-init with the 1,024-token vocabulary; 16 distinct prompts of 20 tokens, each
sampled rows / 16 times (a GRPO batch), R tokens, no EOS. The two ways must sample the same tokens
(checked every round); the median seconds and the 10-90% range of the per-round ratio
forward / lean are reported, 2 warm-up rounds dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.models.generation import sample_responses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl_steps import spread  # noqa: E402

VOCAB, PROMPT, DISTINCT = 1024, 20, 16


def make(name: str):
    family, shape = name.split("-")
    layers, hidden = (int(x) for x in shape.split("x"))
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=hidden // 32, n_positions=256
        )
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=hidden // 48,
        num_key_value_heads=hidden // 48, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def point(lm, rows: int, response: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (DISTINCT, PROMPT), generator=g)
    ids = ids.repeat_interleave(rows // DISTINCT, 0)  # (rows, PROMPT)
    mask = torch.ones_like(ids)
    uniforms = torch.rand(rows, response, generator=g, dtype=torch.float64)
    times: dict[str, list[float]] = {"forward": [], "lean": []}
    for _ in range(rounds + 2):
        out = {}
        for way, flag in (("forward", "0"), ("lean", "1")):
            os.environ["RLHF_LEAN_DECODE"] = flag
            start = time.perf_counter()
            out[way] = sample_responses(lm, ids, mask, response, VOCAB + 1, 0, uniforms=uniforms)
            times[way].append(time.perf_counter() - start)
        assert torch.equal(out["forward"], out["lean"]), "the two ways sampled different tokens"
    forward, lean = times["forward"][2:], times["lean"][2:]
    return {
        "forward_s": spread(forward),
        "lean_s": spread(lean),
        "forward_over_lean": spread([f / b for f, b in zip(forward, lean)]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", default="gpt2-4x128,llama-4x192,llama-8x384")
    parser.add_argument("--responses", default="24,64")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | R | forward s | lean s | forward / lean [10-90%] |\n|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        lm = make(name)
        for response in (int(x) for x in args.responses.split(",")):
            r = point(lm, args.rows, response, args.rounds)
            ratio = r["forward_over_lean"]
            print(
                f"| {name} | {response} | {r['forward_s']['median']:.3f} | "
                f"{r['lean_s']['median']:.3f} | {ratio['median']:.2f}x "
                f"[{ratio['p10']:.2f}, {ratio['p90']:.2f}] |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
