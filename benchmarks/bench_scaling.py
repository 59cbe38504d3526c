"""Weak scaling of distributed PPO: seconds per step with N processes, each with the same batch.

Shapes: B global batch (prompts), b per-process batch, R response tokens.

Run from the repository root (the `rlhf` package importable, e.g. `pip install -e .`):

    python benchmarks/bench_scaling.py                      # CPU: 1 and 2 processes x 1 thread
    python benchmarks/bench_scaling.py --device cuda --world-sizes 1,2,4,8   # a GPU each
    python benchmarks/bench_scaling.py --shard              # FSDP2 instead of DDP
    python benchmarks/bench_scaling.py --shard --sharded-sampling   # FSDP2, weights never gathered whole

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
        gather_for_sampling=not args.sharded_sampling,
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
    # One gradient all-reduce alone: the communication each optimizer step adds.
    grads = torch.zeros(sum(p.numel() for p in trainer.params), device=device)
    allreduce = []
    for _ in range(5):
        world.barrier()
        t0 = time.perf_counter()
        world.all_reduce_sum(grads)
        if device.type == "cuda":
            torch.cuda.synchronize()
        allreduce.append(time.perf_counter() - t0)
    if world.is_main:
        result = {
            "world_size": world.size, "batch": B, "per_rank_batch": args.per_rank_batch,
            "step_s": statistics.median(times), "min_step_s": min(times),
            "phases": {k: statistics.median(v) for k, v in phases.items()},
            "sampled_tokens": sampled, "device": str(device), "shard": args.shard,
            "threads": args.threads, "torch": torch.__version__,
            "allreduce_s": statistics.median(allreduce), "grad_mb": grads.numel() * 4 / 2**20,
        }  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)


def measure(args, world_size: int, side_by_side: bool = False) -> dict:
    """One torchrun group of `world_size` processes; or, `side_by_side`, as many independent
    one-process runs at the same time (the same load on the machine, no communication)."""
    launcher = (
        [sys.executable]
        if side_by_side
        else [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", str(world_size)]
    )  # fmt: skip
    cmd = launcher + [
        __file__, "--worker",
        "--device", args.device, "--threads", str(args.threads),
        "--per-rank-batch", str(args.per_rank_batch), "--response-tokens", str(args.response_tokens),
        "--epochs", str(args.epochs), "--minibatches", str(args.minibatches),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ] + (["--shard"] if args.shard else []) + (
        ["--sharded-sampling"] if args.sharded_sampling else []
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(world_size if side_by_side else 1)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{world_size} processes failed:\n{err[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    if side_by_side:  # the slowest of the independent runs, as a group waits for its slowest
        slowest = max(results, key=lambda r: r["step_s"])
        return dict(slowest, world_size=world_size, side_by_side=True)
    return results[0]


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
    parser.add_argument(
        "--sharded-sampling", action="store_true",
        help="with --shard: sample with the weights kept sharded (--no-gather-for-sampling)",
    )  # fmt: skip
    parser.add_argument(
        "--side-by-side", action="store_true",
        help="also run N independent 1-process runs at once: the machine's own slowdown at N busy "
        "processes, without any communication",
    )  # fmt: skip
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
        + (", sampling with sharded weights" if args.shard and args.sharded_sampling else "")
    )
    results = []
    for n in sizes:
        results.append(measure(args, n))
        if args.side_by_side and n > 1:
            results.append(measure(args, n, side_by_side=True))
    base = results[0]["step_s"]  # efficiency against the first world size (1 by default)
    print("| processes | global batch | s per step (median) | min | generate | forward | score "
          "| update | gradient all-reduce | weak-scaling efficiency |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        p = r["phases"]
        name = f"{r['world_size']} independent" if r.get("side_by_side") else r["world_size"]
        batch = f"{r['per_rank_batch']} each" if r.get("side_by_side") else r["batch"]
        allreduce = "-" if r.get("side_by_side") else f"{r['allreduce_s'] * 1e3:.1f} ms"
        print(
            f"| {name} | {batch} | {r['step_s']:.3f} | {r['min_step_s']:.3f} "
            f"| {p['time/generate_s']:.3f} | {p['time/forward_s']:.3f} | {p['time/score_s']:.3f} "
            f"| {p['time/update_s']:.3f} | {allreduce} | {base / r['step_s']:.2f} |"
        )
    print(f"# gradients: {results[0]['grad_mb']:.1f} MiB per all-reduce, one per optimizer step")
    print(f"# torch {results[0]['torch']}, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
