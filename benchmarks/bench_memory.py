"""Peak memory and seconds of one PPO step: rlhf (full, LoRA, LoRA with a LoRA reward model on the
same base) against TRL 1.12.0's PPOTrainer, on a GPT-2-124M-shaped model on the CPU.

Shapes: B batch (prompts), R response tokens, V vocabulary.

Run from the repository root in the bench venv (see benchmarks/README.md):

    python benchmarks/bench_memory.py [--batches 8,32] [--responses 32,64] [--json out.json]

Every measurement runs in its own fresh Python process, which builds its models and runs one PPO
step (rollout, 4 epochs over one minibatch, optimizer step); the process's peak resident set size
(`ru_maxrss`) is read at the end, and again just before the models are built (the baseline: the
interpreter with torch, transformers and, for TRL, trl and its imports). Both are reported; the
ratios compare peaks.

"lean" rows add --micro-batch-size 4 --rollout-batch-size 4 --gradient-checkpointing, the options
that trade time for memory without changing the update (tests/test_scale_up.py).

The model is GPT-2 124M's shape (12 layers x 768 wide x 12 heads, 1,024 positions, a 50,257-token
vocabulary), random init, dropout 0, float32. Its tokenizer is the project's 1,024-token BPE plus
added placeholder tokens up to 50,257, so that every sampled id decodes. Every model of a side is
its own copy of the same weights, as a user would load them: TRL a policy, a reference, a reward
and a value model (`GPT2ForSequenceClassification`); rlhf a policy with its value head on the trunk,
a reference and a `RewardModel` (full); the policy with LoRA adapters (rank 16, every linear layer)
whose adapters-off self is the reference, and a reward model (LoRA); and, in the third, a reward
model that is a second adapter with its head on the policy's base (LoRA + LoRA RM).

With --jobs N, N workers run at once (on a machine with cores to spare): their memory is their own,
their times are measured under the same shared load.

Settings on both sides: the same B prompts of 6 tokens, R response tokens always sampled (TRL has
no stop token; our random-init model never emits EOS, checked), temperature 1, 4 PPO epochs, 1
minibatch, AdamW, torch threads 2. TRL: per_device_train_batch_size = local_rollout_forward_batch_size
= B, gradient_accumulation_steps 1, no checkpointing, no saving, no generations.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

VOCAB, LAYERS, WIDTH, HEADS = 50257, 12, 768, 12
# rlhf's sides: (LoRA, reward model as a second adapter on the policy's base, lean options).
# "lean" is --micro-batch-size 4 --rollout-batch-size 4 --gradient-checkpointing.
OURS = {
    "rlhf_full": (False, False, False),
    "rlhf_full_lean": (False, False, True),
    "rlhf_lora": (True, False, False),
    "rlhf_lora_lean": (True, False, True),
    "rlhf_lora_shared_rm": (True, True, False),
    "rlhf_lora_shared_rm_lean": (True, True, True),
}
SIDES = ("trl", *OURS)
LABELS = {
    "trl": "TRL 1.12.0 PPOTrainer",
    "rlhf_full": "rlhf, full fine-tuning",
    "rlhf_full_lean": "rlhf, full, lean",
    "rlhf_lora": "rlhf, LoRA r=16",
    "rlhf_lora_lean": "rlhf, LoRA r=16, lean",
    "rlhf_lora_shared_rm": "rlhf, LoRA + LoRA reward model on the same base",
    "rlhf_lora_shared_rm_lean": "rlhf, LoRA + LoRA reward model on the same base, lean",
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----- worker: one side, one configuration, in a fresh process ----------------------------------
def build(seed: int = 0):
    import torch
    from transformers import GPT2Config

    from rlhf.task import corpus
    from rlhf.task.tokenizer import train_tokenizer

    tok = train_tokenizer([r.text for r in corpus.generate_reviews(3000, seed=seed)], 1024)
    tok.add_tokens([f"<extra_{i}>" for i in range(VOCAB - len(tok))])
    config = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return tok, config


DEVICE = "cpu"  # the worker's --device


def lm(config):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)  # every copy holds the same weights
    return GPT2LMHeadModel(config).eval().to(DEVICE)


def on_gpu() -> bool:
    return DEVICE == "cuda"


def timed(fn) -> float:
    import torch

    if on_gpu():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if on_gpu():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_rlhf(side: str, tok, config, batch: int, response: int) -> dict:
    import torch
    from peft import LoraConfig

    from rlhf.models.lora import LoraArgs, apply_lora
    from rlhf.models.reward_model import RewardModel
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.trainer import PPOTrainer

    use_lora, shared_rm, lean = OURS[side]
    cfg = PPOConfig(
        steps=10, batch_size=batch, minibatch_size=batch, ppo_epochs=4, response_tokens=response,
        lr=1e-5, kl_coef=0.05, micro_batch_size=4 if lean else 0,
        rollout_batch_size=4 if lean else 0, gradient_checkpointing=lean, dtype="float32",
    )  # fmt: skip
    lora = LoraArgs(lora_r=16, lora_alpha=32.0)
    if not use_lora:
        policy, ref = lm(config), lm(config)
        reward = RewardModel(lm(config), tokenizer=tok)
    elif not shared_rm:  # the reference is the policy with its adapters off
        policy, ref = apply_lora(lm(config), lora), None
        reward = RewardModel(apply_lora(lm(config), lora, seed=1), tokenizer=tok)
    else:  # and the reward model is a second adapter (and its head) on the policy's base
        policy, ref = apply_lora(lm(config), lora), None
        reward_adapter = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", fan_in_fan_out=True
        )
        policy.add_adapter("reward", reward_adapter)
        policy.set_adapter("default")
        reward = RewardModel(policy, tokenizer=tok, adapter_name="reward")
    trainer = PPOTrainer(policy, ref, reward, tok, cfg)
    prompts = ["the acting was superb and"] * batch
    seconds = timed(lambda: trainer.step(prompts))
    if on_gpu():  # the first step also pays for CUDA's start-up; time a second one
        seconds = timed(lambda: trainer.step(prompts))
    sampled = trainer.last_rollout.R
    ended = sum(trainer.last_rollout.ended)
    return {
        "step_s": seconds,
        "sampled_tokens": sampled,
        "ended": ended,
        "torch": torch.__version__,
    }


def run_trl(tok, config, batch: int, response: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

    def classifier():
        cls_config = copy.deepcopy(config)
        cls_config.num_labels = 1
        model = GPT2ForSequenceClassification(cls_config)
        model.transformer.load_state_dict(lm(config).transformer.state_dict())
        return model.eval()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.start = time.perf_counter()  # the last update's time is kept

    dataset = Dataset.from_dict(
        {"input_ids": [tok("the acting was superb and")["input_ids"]] * batch}
    )
    args = TRLPPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-mem-trl-"), report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=not on_gpu(), bf16=False, fp16=False, gradient_checkpointing=False,
        learning_rate=1e-5, lr_scheduler_type="constant", num_ppo_epochs=4, num_mini_batches=1,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=batch, response_length=response, stop_token=None,
        stop_token_id=None, missing_eos_penalty=None, temperature=1.0, kl_coef=0.05,
        num_sample_generations=0, total_episodes=batch * (2 if on_gpu() else 1), disable_tqdm=True, logging_steps=1, seed=0,
    )  # fmt: skip
    clock = Clock()
    trainer = TRLPPOTrainer(
        args=args, processing_class=tok, model=lm(config), ref_model=lm(config),
        reward_model=classifier(), value_model=classifier(), train_dataset=dataset,
        callbacks=[clock],
    )  # fmt: skip
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.train()
    return {"step_s": clock.seconds, "sampled_tokens": response, "torch": torch.__version__}


def worker(side: str, batch: int, response: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if on_gpu():
        torch.cuda.init()
    if side == "trl":
        import trl.experimental.ppo  # noqa: F401  (its imports count in TRL's baseline)
    import rlhf.rl.trainer  # noqa: F401

    tok, config = build()
    baseline = peak_mib()
    result = (
        run_trl(tok, config, batch, response)
        if side == "trl"
        else run_rlhf(side, tok, config, batch, response)
    )
    result.update(
        side=side, batch=batch, response=response, baseline_mib=baseline, peak_mib=peak_mib()
    )
    if on_gpu():  # GPU memory: what the caching allocator handed out at its peak
        result.update(baseline_mib=0.0, peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    print("RESULT " + json.dumps(result), flush=True)


# ----- driver ---------------------------------------------------------------------------------------
def measure(side: str, batch: int, response: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--grid", f"{batch}x{response}", "--threads", str(threads), "--device", DEVICE]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} B={batch} R={response} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="8x32,32x32,8x64", help="batch x response-length points")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="workers run at once (each a process with --threads threads); 1 on a 2-core machine",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="cpu: peak resident memory; cuda: peak GPU memory (torch.cuda.max_memory_allocated)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    grid = [tuple(int(n) for n in point.split("x")) for point in args.grid.split(",")]
    global DEVICE
    DEVICE = args.device
    if args.worker:
        worker(args.worker, *grid[0], args.threads)
        return 0
    sides = args.sides.split(",")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    results = []
    for batch, response in grid:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each worker is its own process
            futures = {s: pool.submit(measure, s, batch, response, args.threads) for s in sides}
            rows = {side: future.result() for side, future in futures.items()}
        results += rows.values()
        trl = rows.get("trl")
        version = next(iter(rows.values()))["torch"]
        print(f"\nB={batch} prompts, R={response} response tokens (torch {version})")
        what = "peak GPU memory (MiB)" if on_gpu() else "peak RSS (MiB)"
        print(f"| | {what} | of which baseline | peak / TRL's | s per step | / TRL's |")
        print("|---|---:|---:|---:|---:|---:|")
        for side, r in rows.items():
            ratio = f"{r['peak_mib'] / trl['peak_mib']:.2f}x" if trl else "n/a"
            speed = f"{r['step_s'] / trl['step_s']:.2f}x" if trl else "n/a"
            print(
                f"| {LABELS[side]} | {r['peak_mib']:.0f} | {r['baseline_mib']:.0f} | {ratio} "
                f"| {r['step_s']:.1f} | {speed} |"
            )
            if side != "trl" and r["sampled_tokens"] != response:
                print(f"  (note: {side} sampled {r['sampled_tokens']} tokens, not {response})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
