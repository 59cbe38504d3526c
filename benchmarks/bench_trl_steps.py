"""Seconds per GRPO, RLOO, Dr. GRPO and DPO step: rlhf against TRL's GRPOTrainer and DPOTrainer.

Run from the repository root, in an environment with TRL 1.16 (the `bench` extra pins TRL 1.12
for bench_ppo.py, which still has PPOTrainer; this benchmark needs the newer trainers):

    python -m venv /tmp/trl16 && . /tmp/trl16/bin/activate
    pip install -c constraints.txt -e ".[bench-trl]"
    python benchmarks/bench_trl_steps.py [--rounds 10] [--sizes 4x192,8x384] [--responses 24,64]
        [--iterations 1,2] [--only grpo,rloo,dr_grpo,dpo] [--compile] [--trl-compile] [--json out.json]

Both sides get copies of the same random-init Llama (layers x hidden), the project's 1,024-token
tokenizer, fp32 and 2 threads. The sides alternate step by step: TRL's own training loop runs, and
a callback at the end of each of its rounds runs one rlhf round, so both see the same machine load.
The first 2 rounds of each side are warm-up and dropped; the median and the 10-90% range of the
rest are reported, with each side's phases.

GRPO (and its relatives): 16 prompts x 4 samples, R response tokens, the KL to the reference as a
k3 loss term with beta 0.04, clip 0.2, AdamW at lr 1e-6, gradient clipping at 1. `iterations` is
TRL's num_iterations: updates per generation batch (rlhf's --ppo-epochs over one minibatch); with
1, both sides skip the separate old-log-prob pass. The reward is a function of the text that costs
microseconds on both sides. The tokenizer's EOS is a token outside the model's vocabulary, so no
response ends early and both sides sample and train on exactly 64 x R tokens. rlhf's rloo is
measured against GRPOTrainer's grpo loss (the same work; only the baseline differs).

DPO: 256 pairs of about 20 prompt and 20 response tokens, batch 16, one epoch, sigmoid loss with
beta 0.1, reference log-probs computed before training on both sides (untimed), AdamW at lr 1e-6.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

from rlhf.reward.sources import RewardFunction, RewardTerm  # noqa: E402
from rlhf.rl.config import PPOConfig  # noqa: E402
from rlhf.rl.trainer import PPOTrainer  # noqa: E402
from rlhf.task import corpus  # noqa: E402
from rlhf.task.tokenizer import train_tokenizer  # noqa: E402

PROMPTS, SAMPLES = 16, 4
GRPO_PHASES = ("generate", "forward", "score", "update")
DPO_PHASES = ("forward_backward", "optimizer")


def cheap_reward(completions, **kwargs) -> list[float]:
    """Almost free on both sides: the share of vowels in the text."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def build(size: str, seed: int = 0):
    """The tokenizer (EOS outside the vocabulary) and one random-init Llama as (config, weights)."""
    tok = train_tokenizer([r.text for r in corpus.generate_reviews(5000, seed=seed)], 1024)
    vocab = len(tok)
    tok.original_eos = tok.eos_token  # DPO's pairs end in it
    # An EOS the model cannot emit: every response runs to its full length on both sides.
    tok.add_special_tokens({"eos_token": "<|never|>"})
    layers, hidden = (int(x) for x in size.split("x"))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=hidden // 48, num_key_value_heads=hidden // 48,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(config)
    # TRL's GRPOTrainer loads its reference model from the policy's folder.
    folder = tempfile.mkdtemp(prefix=f"bench_trl_{size}_")
    lm.save_pretrained(folder)
    config.folder = folder
    return tok, config, lm.state_dict()


def fresh(config, state) -> LlamaForCausalLM:
    lm = LlamaForCausalLM(config)
    lm.load_state_dict(state)
    return lm.eval()


def spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else [xs[0]] * 9
    return {"median": statistics.median(xs), "p10": q[0], "p90": q[-1], "n": len(xs)}


class Rounds(TrainerCallback):
    """Times TRL's rounds (`per_round` optimizer steps each) and runs one rlhf round after each."""

    def __init__(self, per_round: int, ours):
        self.per_round, self.ours = per_round, ours
        self.trl: list[float] = []
        self.rlhf: list[float] = []
        self._begin = 0.0
        self._spent = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._spent += time.perf_counter() - self._begin
        if state.global_step % self.per_round == 0:
            self.trl.append(self._spent)
            self._spent = 0.0
            start = time.perf_counter()
            self.ours()
            self.rlhf.append(time.perf_counter() - start)


class Phases:
    """Wraps methods of an object to add the time spent in each to a named phase."""

    def __init__(self):
        self.now: dict[str, float] = {}
        self.rounds: list[dict[str, float]] = []

    def wrap(
        self,
        obj,
        method: str,
        phase,
    ):
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                name = phase() if callable(phase) else phase
                self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)

    def close_round(self) -> None:
        self.rounds.append(self.now)
        self.now = {}


# ----- GRPO ----------------------------------------------------------------------------------
def ours_grpo(
    method: str, tok, config, state, response: int, iterations: int, compile: bool = False
) -> PPOTrainer:
    cfg = PPOConfig(
        steps=10**6, batch_size=PROMPTS, samples_per_prompt=SAMPLES,
        minibatch_size=PROMPTS * SAMPLES, ppo_epochs=iterations, response_tokens=response,
        lr=1e-6, kl_coef=0.04, kl_in="loss", kl_estimator="k3", clip_eps=0.2, dtype="float32",
        advantage_estimator=method, max_grad_norm=1.0, compile=compile,
    )  # fmt: skip
    lm = fresh(config, state)
    return PPOTrainer(
        lm, copy.deepcopy(lm), None, tok, cfg,
        reward_terms=[RewardTerm(RewardFunction(cheap_reward, name="vowels"))],
    )  # fmt: skip


def trl_grpo(
    loss_type: str,
    tok,
    config,
    state,
    response: int,
    iterations: int,
    rounds: int,
    compile: bool = False,
):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = corpus.prompts(PROMPTS, seed=3, split="train")
    args = GRPOConfig(
        output_dir="/tmp/bench_trl_grpo", per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES, max_completion_length=response, num_iterations=iterations,
        beta=0.04, epsilon=0.2, loss_type=loss_type,
        scale_rewards="group" if loss_type == "grpo" else "none", learning_rate=1e-6,
        max_grad_norm=1.0, temperature=1.0, top_k=0, top_p=1.0, max_steps=rounds * iterations,
        use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=10**6,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        torch_compile=compile,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": prompts * (rounds + 4)})
    return GRPOTrainer(
        model=config.folder, reward_funcs=[cheap_reward], args=args,
        train_dataset=data, processing_class=tok,
    )  # fmt: skip


def grpo_point(
    method, loss_type, tok, config, state, response, iterations, rounds, compile=(False, False)
) -> dict:
    ours = ours_grpo(method, tok, config, state, response, iterations, compile[0])
    prompts = corpus.prompts(PROMPTS, seed=3, split="train")
    ours_phases: list[dict[str, float]] = []

    def our_round():
        m = ours.step(prompts)
        assert ours.last_rollout.R == response, "every response must run to R tokens"
        ours_phases.append({p: m[f"time/{p}_s"] for p in GRPO_PHASES})

    trainer = trl_grpo(loss_type, tok, config, state, response, iterations, rounds + 2, compile[1])
    phases = Phases()
    phases.wrap(trainer, "_generate_single_turn", "generate")
    phases.wrap(trainer, "_calculate_rewards", "score")
    phases.wrap(
        trainer, "_get_per_token_logps_and_entropies",
        lambda: "update" if torch.is_grad_enabled() else "forward",
    )  # fmt: skip
    rounds_cb = Rounds(iterations, our_round)

    class ClosePhases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % iterations == 0:
                phases.close_round()

    trainer.add_callback(ClosePhases())  # before Rounds, so rlhf's round is not counted
    trainer.add_callback(rounds_cb)
    lengths = []
    inner = trainer._generate_single_turn

    def counted(*args, **kwargs):
        out = inner(*args, **kwargs)
        lengths.extend(len(c) for c in out[0])  # completion ids, one list per row
        return out

    trainer._generate_single_turn = counted
    trainer.train()
    assert set(lengths) == {response}, f"TRL's responses must run to {response} tokens"
    trl_phases = []
    for row, total in zip(phases.rounds, rounds_cb.trl):
        row = dict(row)
        row["update"] = total - row.get("generate", 0) - row.get("forward", 0) - row.get("score", 0)
        trl_phases.append(row)
    return summarise(rounds_cb.rlhf, rounds_cb.trl, ours_phases, trl_phases, GRPO_PHASES)


def summarise(ours, trl, ours_phases, trl_phases, names) -> dict:
    first = {"rlhf_first_s": ours[0], "trl_first_s": trl[0]}  # with any compiling
    ours, trl = ours[2:], trl[2:]
    ratios = [t / o for t, o in zip(trl, ours)]
    return {
        "rlhf_s": spread(ours),
        "trl_s": spread(trl),
        "trl_over_rlhf": spread(ratios),
        "rlhf_phases": {
            p: statistics.median(r.get(p, 0.0) for r in ours_phases[2:]) for p in names
        },
        "trl_phases": {p: statistics.median(r.get(p, 0.0) for r in trl_phases[2:]) for p in names},
        **first,
    }


# ----- DPO -----------------------------------------------------------------------------------
def dpo_pairs(tok, n: int = 256, seed: int = 5) -> dict[str, list[str]]:
    """Prompts and two responses of about 20 tokens each, cut from the task's reviews."""
    reviews = [r.text for r in corpus.generate_reviews(3 * n, seed=seed)]

    def cut(text: str, k: int = 20) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:k])

    return {
        "prompt": [cut(reviews[3 * i]) for i in range(n)],
        "chosen": [" " + cut(reviews[3 * i + 1]) for i in range(n)],
        "rejected": [" " + cut(reviews[3 * i + 2]) for i in range(n)],
    }


def dpo_point(
    tok, config, state, rounds: int, batch: int = 16, compile: tuple[bool, bool] = (False, False)
) -> dict:
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from rlhf.reward.preferences import Pairs
    from rlhf.rl.dpo import DPOStep, batched_logps, encode_pairs

    # Both sides close each response with the EOS: the tokenizer's real one here.
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.original_eos
    data = dpo_pairs(tok)
    n = len(data["prompt"])
    pairs = Pairs(data["prompt"], data["chosen"], data["rejected"], [None] * n)
    chosen, rejected, _ = encode_pairs(tok, pairs, 128)
    policy, ref = fresh(config, state), fresh(config, state).requires_grad_(False)
    device = torch.device("cpu")
    ref_logps = batched_logps(ref, chosen, rejected, tok.pad_token_id, device, batch)  # (n, 2)
    if compile[0]:
        from rlhf.models.forward import compile_forward

        compile_forward(policy)
    step = DPOStep(policy, lr=1e-6, total_steps=n // batch, beta=0.1)
    order = list(range(n))
    ours_phases: list[dict[str, float]] = []
    position = [0]

    def our_round():
        s = position[0] % (n // batch)
        idx = order[s * batch : (s + 1) * batch]
        position[0] += 1
        _, timing = step.run(
            [chosen[i] for i in idx], [rejected[i] for i in idx], ref_logps[idx], tok.pad_token_id
        )
        ours_phases.append(timing)

    epochs = max(1, -(-(rounds + 2) * batch // n))
    args = TRLDPOConfig(
        output_dir="/tmp/bench_trl_dpo", per_device_train_batch_size=batch, beta=0.1,
        learning_rate=1e-6, max_grad_norm=1.0, num_train_epochs=epochs,
        max_steps=rounds + 2, precompute_ref_log_probs=True, use_cpu=True, bf16=False,
        report_to=[], logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, torch_compile=compile[1],
    )  # fmt: skip
    trainer = DPOTrainer(
        model=fresh(config, state), args=args, train_dataset=Dataset.from_dict(data),
        processing_class=tok,
    )  # fmt: skip
    rounds_cb = Rounds(1, our_round)
    trainer.add_callback(rounds_cb)
    trainer.train()
    trl_phases = [{"forward_backward": t} for t in rounds_cb.trl]
    return summarise(rounds_cb.rlhf, rounds_cb.trl, ours_phases, trl_phases, DPO_PHASES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side and point")
    parser.add_argument("--sizes", default="4x192,8x384", help="models as LAYERSxHIDDEN")
    parser.add_argument("--responses", default="24,64", help="GRPO response tokens")
    parser.add_argument("--iterations", default="1,2", help="GRPO updates per generation batch")
    parser.add_argument("--only", default="grpo,rloo,dr_grpo,dpo", help="which steps to measure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--compile", action="store_true", help="rlhf side: --compile (torch.compile, dynamic)"
    )
    parser.add_argument(
        "--trl-compile", action="store_true", help="TRL side: torch_compile=True in GRPOConfig"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = args.only.split(",")
    pairing = {"grpo": "grpo", "rloo": "grpo", "dr_grpo": "dr_grpo"}
    results = []
    for size in args.sizes.split(","):
        tok, config, state = build(size)
        if "dpo" in only:
            r = dpo_point(tok, config, state, args.rounds, compile=(args.compile, args.trl_compile))
            results.append(
                {"step": "dpo", "size": size, "rlhf_compile": args.compile,
                 "trl_compile": args.trl_compile, **r}
            )  # fmt: skip
            report(results[-1])
        for response in (int(x) for x in args.responses.split(",")):
            for iterations in (int(x) for x in args.iterations.split(",")):
                for method in (m for m in ("grpo", "rloo", "dr_grpo") if m in only):
                    r = grpo_point(
                        method, pairing[method], tok, config, state, response, iterations,
                        args.rounds, (args.compile, args.trl_compile),
                    )  # fmt: skip
                    results.append(
                        {"step": method, "trl_loss_type": pairing[method], "size": size,
                         "response": response, "iterations": iterations,
                         "rlhf_compile": args.compile, "trl_compile": args.trl_compile, **r}
                    )  # fmt: skip
                    report(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": args.threads, "results": results},
                f,
                indent=1,
            )


def report(r: dict) -> None:
    where = f"{r['step']:8s} {r['size']:>6s}"
    if r["step"] != "dpo":
        where += f" R={r['response']:<3d} it={r['iterations']}"
    ratio = r["trl_over_rlhf"]
    phases = lambda d: " ".join(f"{k}={v:.3f}" for k, v in d.items())  # noqa: E731
    print(
        f"{where}  rlhf {r['rlhf_s']['median']:.3f}s  trl {r['trl_s']['median']:.3f}s  "
        f"trl/rlhf {ratio['median']:.2f}x [{ratio['p10']:.2f}, {ratio['p90']:.2f}]  "
        f"first rounds {r['rlhf_first_s']:.1f}s / {r['trl_first_s']:.1f}s\n"
        f"    rlhf: {phases(r['rlhf_phases'])}\n    trl:  {phases(r['trl_phases'])}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
