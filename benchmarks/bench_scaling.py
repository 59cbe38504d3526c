"""Weak scaling of distributed PPO: seconds per step with N processes, each with the same batch.

Shapes: B global batch (prompts), b per-process batch, R response tokens.

Run from the repository root (the `rlhf` package importable, e.g. `pip install -e .`):

    python benchmarks/bench_scaling.py                              # CPU: 1 and 2 processes x 1 thread
    python benchmarks/bench_scaling.py --device cuda --world-sizes 1,2,4,8   # one GPU per process
    python benchmarks/bench_scaling.py --shard                      # FSDP2 instead of DDP

For each world size N the script starts `torchrun --standalone --nproc-per-node N` on itself (gloo
on the CPU, NCCL on CUDA). Every process builds the same random-init GPT-2 of the built-in task's
size (4 layers x 128 wide x 4 heads, the project's 1,024-token BPE vocabulary; 1.07M parameters)
as policy, reference and reward model, and a `PPOTrainer` over the process group, with a global
batch of N x b prompts: the per-process batch b stays the same, so perfect scaling keeps the time
per step constant. Weak-scaling efficiency at N = (seconds per step at 1) / (seconds per step at
N). A random-init model gives EOS about 1/1024 of its mass, so every row samples all R tokens and
the processes have equal work. Each step is timed between two barriers, after warm-up steps; the
median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PHASES = ("time/generate_s", "time/forward_s", "time/score_s", "time/update_s")


def worker(args) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.models.reward_model import RewardModel
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.launch import init_world
    from rlhf.rl.trainer import PPOTrainer
    from rlhf.task import corpus
    from rlhf.task.tokenizer import train_tokenizer

    torch.set_num_threads(args.threads)
    world = init_world(args.device)
    tok = train_tokenizer([r.text for r in corpus.generate_reviews(5000, seed=0)], 1024)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    state = GPT2LMHeadModel(config).state_dict()
    device = getattr(world, "device", torch.device(args.device))  # cuda:LOCAL_RANK under torchrun

    def lm():
        model = GPT2LMHeadModel(config)
        model.load_state_dict(state)
        return model.eval().to(device)

    B = args.per_rank_batch * world.size
    cfg = PPOConfig(
        steps=10**6, batch_size=B, minibatch_size=B // args.minibatches, ppo_epochs=args.epochs,
        response_tokens=args.response_tokens, lr=1e-5, kl_coef=0.05, shard=args.shard, seed=0,
    )  # fmt: skip
    reward = RewardModel(lm(), tokenizer=tok).to(device)
    trainer = PPOTrainer(lm(), lm(), reward, tok, cfg, world=world)
    prompts = corpus.prompts(B, seed=0)
    times, phases = [], {k: [] for k in PHASES}
    for step in range(args.warmup + args.steps):
        world.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = trainer.step(prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        world.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            for k in PHASES:
                phases[k].append(metrics[k])
    sampled = trainer.last_rollout.response_mask.shape[1]
    if world.is_main:
        result = {
            "world_size": world.size, "batch": B, "per_rank_batch": args.per_rank_batch,
            "step_s": statistics.median(times), "min_step_s": min(times),
            "phases": {k: statistics.median(v) for k, v in phases.items()},
            "sampled_tokens": sampled, "device": str(device), "shard": args.shard,
            "threads": args.threads, "torch": torch.__version__,
        }  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)


def measure(args, world_size: int) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(world_size), __file__, "--worker",
        "--device", args.device, "--threads", str(args.threads),
        "--per-rank-batch", str(args.per_rank_batch), "--response-tokens", str(args.response_tokens),
        "--epochs", str(args.epochs), "--minibatches", str(args.minibatches),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ] + (["--shard"] if args.shard else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{world_size} processes failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2", help="process counts to compare")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--per-rank-batch", type=int, default=32, help="prompts per process")
    parser.add_argument("--response-tokens", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shard", action="store_true", help="FSDP2 (--shard) instead of DDP")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    sizes = [int(n) for n in args.world_sizes.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; "
        f"{args.device}, {args.threads} thread(s) per process, b={args.per_rank_batch} prompts "
        f"per process, R={args.response_tokens}, {args.epochs} epochs x {args.minibatches} "
        f"minibatch(es), {'FSDP2' if args.shard else 'DDP'}"
    )
    results = [measure(args, n) for n in sizes]
    base = results[0]["step_s"]  # efficiency against the first world size (1 by default)
    print("| processes | global batch | s per step (median) | min | generate | forward | score "
          "| update | weak-scaling efficiency |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        p = r["phases"]
        print(
            f"| {r['world_size']} | {r['batch']} | {r['step_s']:.3f} | {r['min_step_s']:.3f} "
            f"| {p['time/generate_s']:.3f} | {p['time/forward_s']:.3f} | {p['time/score_s']:.3f} "
            f"| {p['time/update_s']:.3f} | {base / r['step_s']:.2f} |"
        )
    print(f"# torch {results[0]['torch']}, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
