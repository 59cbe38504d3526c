"""How far rlhf's GRPO step is from the time its matrix products alone take on this machine.

    python benchmarks/roofline_grpo.py                     # 4x192 and 8x384, R = 24 and 64
    python benchmarks/roofline_grpo.py --sizes 8x384 --responses 64 --steps 6

For the GRPO step `bench_trl_steps.py` times (16 prompts x 4 samples, one iteration, the KL as a
loss term, the same random-init Llama), every linear layer's matrix product is listed for each
phase, with the shapes the phase gives it:

- sampling: the prefill over the 16 distinct prompts (the LM head on their last position only),
  then R - 1 decode steps over 64 rows (the first token comes from the prefill's logits);
- the reference pass: each prompt's tokens once and each row's R response tokens (rlhf's shared
  prompts), the LM head on response positions only;
- the update: that forward pass again, and its backward pass: for every linear layer the input's
  gradient and the weight's gradient, each a product of the forward's size.

Each distinct product is timed alone (`torch.mm`, fp32, median of repeats), so the floor counts
every product at the efficiency this machine reaches at that shape (small decode products run far
below the large ones). Attention, norms, activations, the optimizer and Python are left out: the
floor is a lower bound on any implementation that does this arithmetic, TRL's included. rlhf's own
phases are measured in the same process (`PPOTrainer.step`, medians) and set against it; TRL's
are read from `--trl` (a `bench_trl_steps.py --json` file) when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trl_steps import PROMPTS, SAMPLES, build, ours_grpo  # noqa: E402
from rlhf.task import corpus  # noqa: E402


def linears(cfg) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder block of a Llama config."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def products(cfg, P: int, R: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per phase: (M, K, N, count) for each matrix product M x K times K x N, `count` times."""
    U, B, L, V, h = (
        PROMPTS,
        PROMPTS * SAMPLES,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.hidden_size,
    )
    block = linears(cfg)
    sampling = [(U * P, k, n, L) for k, n in block] + [(U, h, V, 1)]
    sampling += [(B, k, n, L * (R - 1)) for k, n in block] + [(B, h, V, R - 1)]
    T = U * P + B * R  # tokens through the blocks once each
    forward = [(T, k, n, L) for k, n in block] + [(B * R, h, V, 1)]
    backward = []
    for M, K, N, count in forward:
        backward += [(M, N, K, count), (K, M, N, count)]  # input's gradient, weight's gradient
    return {"generate": sampling, "forward": forward, "update": forward + backward}


def mm_seconds(M: int, K: int, N: int, repeats: int) -> float:
    a, b = torch.randn(M, K), torch.randn(K, N)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor(phase: list[tuple[int, int, int, int]], cache: dict, repeats: int) -> tuple[float, float]:
    """(seconds, GFLOP) of a phase's products at their measured speed."""
    seconds = flops = 0.0
    for M, K, N, count in phase:
        if (M, K, N) not in cache:
            cache[M, K, N] = mm_seconds(M, K, N, repeats)
        seconds += count * cache[M, K, N]
        flops += count * 2 * M * K * N
    return seconds, flops / 1e9


def point(size: str, R: int, args, trl: dict) -> dict:
    tok, config, state = build(size)
    prompts = corpus.prompts(PROMPTS, seed=3, split="train")
    P = round(statistics.mean(len(tok(p)["input_ids"]) for p in prompts))
    trainer = ours_grpo("grpo", tok, config, state, R, 1)
    phases: list[dict] = []
    for step in range(args.steps + 2):
        m = trainer.step(prompts)
        if step >= 2:  # two warm-up steps
            phases.append({k: m[f"time/{k}_s"] for k in ("generate", "forward", "update", "step")})
    ours = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    cache: dict = {}
    row = {"size": size, "R": R, "P": P, "phases": {}}
    for name, phase in products(config, P, R).items():
        seconds, gflop = floor(phase, cache, args.repeats)
        row["phases"][name] = {"floor_s": seconds, "gflop": gflop, "rlhf_s": ours[name]}
    row["floor_s"] = sum(p["floor_s"] for p in row["phases"].values())
    row["rlhf_s"] = ours["step"]
    if (size, R) in trl:
        row["trl_s"] = trl[size, R]
    return row


def show(row: dict) -> None:
    print(f"{row['size']} R={row['R']} (prompts of {row['P']} tokens):")
    for name, p in row["phases"].items():
        print(
            f"  {name:>8}: {p['gflop']:7.1f} GFLOP, floor {p['floor_s']:.3f} s "
            f"({p['gflop'] / p['floor_s']:.0f} GFLOP/s), rlhf {p['rlhf_s']:.3f} s = "
            f"{p['rlhf_s'] / p['floor_s']:.2f}x the floor"
        )
    line = f"  step: floor {row['floor_s']:.3f} s, rlhf {row['rlhf_s']:.3f} s = {row['rlhf_s'] / row['floor_s']:.2f}x"
    if "trl_s" in row:
        t = row["trl_s"]
        line += (
            f"; TRL {t:.3f} s = {t / row['floor_s']:.2f}x: 1.5x TRL needs rlhf at "
            f"{t / 1.5:.3f} s = {t / 1.5 / row['floor_s']:.2f}x the floor"
        )
    print(line)
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4x192,8x384")
    p.add_argument("--responses", default="24,64")
    p.add_argument("--steps", type=int, default=8, help="timed rlhf steps per point")
    p.add_argument("--repeats", type=int, default=20, help="timings of each product")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl", help="a bench_trl_steps.py --json file, for TRL's seconds per step")
    p.add_argument(
        "--trl-seconds", default="",
        help="or TRL's GRPO seconds per step by hand: SIZE:R=SECONDS,... (4x192:24=0.517)",
    )  # fmt: skip
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trl = {}
    if args.trl:
        for r in json.loads(Path(args.trl).read_text())["results"]:
            if r["step"] == "grpo" and r["iterations"] == 1:
                trl[r["size"], r["response"]] = r["trl_s"]["median"]
    for item in filter(None, args.trl_seconds.split(",")):
        where, seconds = item.split("=")
        size, R = where.split(":")
        trl[size, int(R)] = float(seconds)
    rows = []
    for size in args.sizes.split(","):
        for R in (int(r) for r in args.responses.split(",")):
            rows.append(point(size, R, args, trl))
            show(rows[-1])
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
