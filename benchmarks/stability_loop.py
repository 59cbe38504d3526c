"""Exit stability of distributed `rlhf ppo`: N two-process torchrun runs, counting how each ended.

Run from the repository root (the `rlhf` package importable, e.g. `pip install -e .`):

    python benchmarks/stability_loop.py             # 200 runs: 100 DDP, 100 --shard, alternating
    python benchmarks/stability_loop.py --runs 20 --keep-logs runs/stability-logs
    python benchmarks/stability_loop.py --runs 100 --kinds shard   # --shard runs only

Finished two-process --shard runs under gloo used to abort at exit now and then ("terminate
called without an active exception", 3 of 92): torch 2.13's `destroy_process_group` leaves
gloo's threads running once DDP or FSDP2 was built, and they raced the interpreter's shutdown.
Workers now leave with `os._exit` (`rlhf.rl.launch.exit_worker`); this loop is the evidence.

Every run is `torchrun --standalone --nproc-per-node 2 -m rlhf ppo` on the CPU (gloo, one thread
per process) with a tiny GPT-2 (2 layers x 32 wide, a 300-token BPE vocabulary) built once as
policy and reward model, 2 steps of a batch of 4, a checkpoint after each step. A run is "ok"
when torchrun exits 0 and the summary line appears once; otherwise it counts as "abort" (the
message is in its log), "exit N" (torchrun's exit code) or "timeout". One summary line at the end
(also written as JSON with --json); the exit status is 0 when every run was ok.
PYTHONFAULTHANDLER is left unset (--faulthandler sets it): with it set, 80 launches had shown no
abort before the fix.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABORT = "terminate called without an active exception"
PROMPTS = ["the phone ?", "the plot ?", "the acting was superb ?", "i want"]


def build_inputs(root: Path) -> None:
    """A tiny policy and reward model, saved as Hugging Face folders, and a prompt file."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Writing model shards" bars

    from rlhf.models.reward_model import RewardModel
    from rlhf.task import corpus
    from rlhf.task.tokenizer import train_tokenizer

    tok = train_tokenizer([r.text for r in corpus.generate_reviews(2000, seed=0)], 300)

    def lm(seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()

    lm(0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    RewardModel(lm(3), tokenizer=tok).save_pretrained(root / "rm")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")


def command(root: Path, out: Path, shard: bool) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "rlhf", "ppo", "--model", str(root / "policy"), "--reward-model", str(root / "rm"),
        "--prompts", str(root / "prompts.txt"), "--out", str(out), "--steps", "2",
        "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "2",
        "--response-tokens", "6", "--save-every", "1", "--device", "cpu",
        *(["--shard"] if shard else []),
    ]  # fmt: skip


def environment(faulthandler: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONFAULTHANDLER", None)
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def outcome(code: int | None, log: str) -> str:
    """How one run ended, in a word or two."""
    if code is None:
        return "timeout"
    if ABORT in log:
        return "abort"
    if code == 0 and log.count("PPO: 2 steps") == 1:
        return "ok"
    return f"exit {code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=200, help="runs in all, the --kinds taking turns"
    )
    parser.add_argument(
        "--kinds", default="ddp,shard", help="ddp (data-parallel), shard (--shard) or both"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one run")
    parser.add_argument("--faulthandler", action="store_true", help="set PYTHONFAULTHANDLER=1")
    parser.add_argument("--keep-logs", default=None, help="folder for the logs of runs not ok")
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    args = parser.parse_args()

    env = environment(args.faulthandler)
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - {"ddp", "shard"}:
        parser.error(f"--kinds {args.kinds}: give ddp, shard or ddp,shard")
    counts = {kind: collections.Counter() for kind in kinds}
    seconds: list[float] = []
    keep = Path(args.keep_logs) if args.keep_logs else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf-stability-") as tmp:
        root = Path(tmp)
        build_inputs(root)
        for i in range(args.runs):
            kind = kinds[i % len(kinds)]
            out = root / f"run-{i}"
            began = time.perf_counter()
            with tempfile.TemporaryFile("w+") as log:
                try:
                    code = subprocess.run(
                        command(root, out, shard=kind == "shard"), cwd=REPO, env=env,
                        stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout,
                    ).returncode  # fmt: skip
                except subprocess.TimeoutExpired:  # subprocess.run killed torchrun
                    code = None
                log.seek(0)
                text = log.read()
            seconds.append(time.perf_counter() - began)
            result = outcome(code, text)
            counts[kind][result] += 1
            if result != "ok" and keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"run-{i:04d}-{kind}.log").write_text(text)
            shutil.rmtree(out, ignore_errors=True)
            print(f"run {i + 1}/{args.runs} {kind}: {result} ({seconds[-1]:.1f} s)", flush=True)
    wall = time.perf_counter() - start
    done = sum(sum(c.values()) for c in counts.values())
    aborts = sum(c["abort"] for c in counts.values())
    parts = [
        f"{kind} {sum(c.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        for kind, c in counts.items()
    ]
    print(
        f"stability: {done} two-process runs in {wall:.0f} s ({wall / max(done, 1):.1f} s each); "
        f"{'; '.join(parts)}; aborts {aborts}"
    )
    if args.json:
        record = {
            "runs": done, "wall_s": round(wall, 1), "aborts": aborts,
            "counts": {kind: dict(c) for kind, c in counts.items()},
            "faulthandler": args.faulthandler, "command": " ".join(sys.argv),
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(0 if all(set(c) <= {"ok"} for c in counts.values()) else 1)


if __name__ == "__main__":
    main()
