"""Seconds per PPO update: ours against TRL 1.12.0's PPOTrainer, and against the model passes it needs.

Shapes: B batch (prompts), M minibatch, P prompt tokens, R response tokens, V vocabulary.

Run from the repository root in the bench venv (see benchmarks/README.md):

    python benchmarks/bench_ppo.py [--steps 16] [--batch-size 32] [--response-tokens 24] [--json out.json]

Both implementations get the same random-init GPT-2 (4 layers x 128 wide x 4 heads, the project's
1,024-token BPE vocabulary), the same 32 prompts every update, 24 response tokens, 4 PPO epochs,
1 (and 4) minibatches, temperature 1, a constant learning rate, fp32, on the CPU with 2 threads.

Equal work: TRL is given no stop token, so its `generate` always samples R tokens. Ours stops
sampling only when every row has emitted EOS; a random-init model puts about 1/V of its mass on EOS,
so no batch ever ends early and every step samples R tokens too (checked below, per step). All
later passes run on the full (B, P+R) sequences in both, whatever the masks say.

Timing: TRL's `train()` runs its own loop and cannot be stepped from outside, so the benchmark is
driven from a TRL callback: at the end of every TRL update (`on_step_end`) it stamps the time, runs
one of our `PPOTrainer.step(prompts)` calls (timed from outside) and, alternately, the isolated
model passes or our separate-value-network variant, then switches TRL's `gc.collect()` on or off for
the next update and restarts the clock. A TRL update is the time from one callback's return to the
next callback; it holds TRL's two `gc.collect()` calls (one after its rollout, one after the
previous update's `on_step_end`). "TRL without gc" swaps the `gc` name inside TRL's ppo_trainer
module for a counter whose `collect` does nothing; nothing else changes. So the implementations
alternate update by update under the same machine load, and the medians are reported; the first
two updates of everything are warm-up and are dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings

import torch

# TRL's experimental package warns on import; the warning is about API stability, not speed.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    TrainerCallback,
)

from rlhf.core import logprobs_from_logits  # noqa: E402
from rlhf.models.forward import position_ids_from_mask  # noqa: E402
from rlhf.models.generation import encode_prompts, sample_responses  # noqa: E402
from rlhf.models.reward_model import RewardModel  # noqa: E402
from rlhf.rl.config import PPOConfig  # noqa: E402
from rlhf.rl.trainer import PPOTrainer  # noqa: E402
from rlhf.task import corpus  # noqa: E402
from rlhf.task.tokenizer import train_tokenizer  # noqa: E402

LR = 1e-5  # any constant will do for timing; the same for both
PHASES = ("time/generate_s", "time/forward_s", "time/score_s", "time/update_s", "time/step_s")
CLOCK = time.perf_counter  # --clock cpu swaps in time.process_time, here and inside rlhf.rl.trainer


# ----- shared setup ------------------------------------------------------------------------
def build_base(seed: int = 0):
    """The project's BPE tokenizer and one random-init GPT-2 (config and weights) for everyone."""
    tok = train_tokenizer([r.text for r in corpus.generate_reviews(5000, seed=seed)], 1024)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    state = GPT2LMHeadModel(config).state_dict()
    return tok, config, state


def fresh_lm(config, state) -> GPT2LMHeadModel:
    lm = GPT2LMHeadModel(config)
    lm.load_state_dict(state)
    return lm.eval()


def fresh_classifier(config, state) -> GPT2ForSequenceClassification:
    """GPT-2 trunk with the same weights and a scalar `score` head, as TRL's reward/value model."""
    cls_config = copy.deepcopy(config)
    cls_config.num_labels = 1
    model = GPT2ForSequenceClassification(cls_config)
    trunk = {
        k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")
    }
    model.transformer.load_state_dict(trunk)
    return model.eval()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----- ours ----------------------------------------------------------------------------------
def build_ours(
    tok, config, state, args, minibatches: int, value_model: str = "shared"
) -> PPOTrainer:
    cfg = PPOConfig(
        steps=10**6, batch_size=args.batch_size, minibatch_size=args.batch_size // minibatches,
        ppo_epochs=args.epochs, response_tokens=args.response_tokens, temperature=1.0, lr=LR,
        lr_schedule="constant", kl_coef=0.05, vf_coef=0.1, clip_eps=0.2, value_clip_eps=0.2,
        gamma=1.0, lam=0.95, value_model=value_model, seed=0,
    )  # fmt: skip
    policy = fresh_lm(config, state)
    reward = RewardModel(fresh_lm(config, state), freeze_base=True, tokenizer=tok)
    return PPOTrainer(policy, fresh_lm(config, state), reward, tok, cfg)


def time_ours(trainer: PPOTrainer, prompts: list[str], P: int, out: dict) -> None:
    """One `step`, timed from outside, with its own phase timings and the number of tokens sampled."""
    t0 = CLOCK()
    metrics = trainer.step(prompts)
    out.setdefault("step_s", []).append(CLOCK() - t0)
    for key in PHASES:
        out.setdefault(key, []).append(metrics[key])
    out.setdefault("sampled_tokens", []).append(trainer.last_rollout.query_response.shape[1] - P)


# ----- TRL 1.12.0 ------------------------------------------------------------------------------
class _GCSwitch:
    """Stands in for the `gc` module inside TRL's ppo_trainer: counts calls, optionally skips them."""

    def __init__(self):
        self.enabled, self.calls = True, 0

    def collect(self, *a, **k):
        self.calls += 1
        return gc.collect(*a, **k) if self.enabled else 0


class Interleaver(TrainerCallback):
    """Drives the whole benchmark from inside TRL's `train()` loop.

    TRL's loop cannot be stepped from outside, so at the end of each TRL update (`on_step_end`) this
    callback stamps the time, runs the other measurements (our step, the isolated passes), flips
    TRL's gc between shipped and skipped for the next update, and restarts the clock. A TRL update is
    the time from one callback's return to the next callback: it holds one `gc.collect()` after the
    rollout and the one after the previous update's `on_step_end`. So every implementation is
    measured update by update, alternating, under the same machine load.
    """

    def __init__(self, module, others, warmup: int):
        self.module, self.others, self.warmup = module, others, warmup
        self.gc, self.empty_cache_calls, self.sampled = _GCSwitch(), 0, []
        self.times: dict[str, list[float]] = {"trl": [], "trl_no_gc": []}
        self.calls = {"trl": [0, 0], "trl_no_gc": [0, 0]}  # gc.collect, empty_cache
        self.n = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = CLOCK()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = CLOCK() - self.start
        mode = "trl" if self.gc.enabled else "trl_no_gc"
        measured = self.n >= self.warmup
        if measured:
            self.times[mode].append(elapsed)
        # The calls of this interval: the previous update's trailing gc.collect and this rollout's.
        self.calls[mode][0] += self.gc.calls if measured else 0
        self.calls[mode][1] += self.empty_cache_calls if measured else 0
        self.others(self.n, measured)
        self.n += 1
        self.gc.enabled = self.n % 2 == 0
        self.gc.calls = self.empty_cache_calls = 0
        self.start = CLOCK()

    @contextlib.contextmanager
    def patched(self):
        """Route ppo_trainer's `gc` and `empty_cache` through counters; record sampled lengths."""
        module = self.module
        saved = module.gc, module.empty_cache, module.batch_generation
        real_empty, real_generation = module.empty_cache, module.batch_generation

        def counted_empty_cache():
            self.empty_cache_calls += 1
            real_empty()

        def recorded_generation(model, queries, *a, **k):
            query_responses, logits = real_generation(model, queries, *a, **k)
            self.sampled.append(query_responses.shape[1] - queries.shape[1])
            return query_responses, logits

        module.gc, module.empty_cache, module.batch_generation = (
            self.gc,
            counted_empty_cache,
            recorded_generation,
        )
        try:
            yield
        finally:
            module.gc, module.empty_cache, module.batch_generation = saved


def build_trl(tok, config, state, prompts, args, minibatches: int, updates: int):
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    trl_args = TRLPPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        learning_rate=LR, lr_scheduler_type="constant", num_ppo_epochs=args.epochs,
        num_mini_batches=minibatches, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_tokens, stop_token=None, stop_token_id=None,
        missing_eos_penalty=None, temperature=1.0, kl_coef=0.05, vf_coef=0.1, cliprange=0.2,
        cliprange_value=0.2, gamma=1.0, lam=0.95, num_sample_generations=0,
        total_episodes=updates * args.batch_size, disable_tqdm=True, logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = TRLPPOTrainer(
        args=trl_args, processing_class=tok, model=fresh_lm(config, state),
        ref_model=fresh_lm(config, state), reward_model=fresh_classifier(config, state),
        value_model=fresh_classifier(config, state), train_dataset=dataset,
    )  # fmt: skip
    for cb in (PrinterCallback, ProgressCallback):  # keep stdout for the table
        trainer.remove_callback(cb)
    return trainer


# ----- the passes an update cannot avoid ---------------------------------------------------
class Passes:
    """Each model pass of one update, alone, on the same shapes as our step.

    The models and the optimizer are copies of our trainer's, so whatever the trainer does to them
    (a faster kernel, a fused optimizer) is in the passes too, and the ratio stays about overhead.
    """

    def __init__(self, trainer: PPOTrainer, prompts: list[str], args, minibatches: int):
        self.tok, self.args, self.minibatch = (
            trainer.tokenizer,
            args,
            args.batch_size // minibatches,
        )
        self.policy = copy.deepcopy(trainer.policy)
        self.ref = copy.deepcopy(trainer.ref_model)
        self.reward = copy.deepcopy(trainer.reward_model)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = trainer.optimizer
        kwargs = {k: v for k, v in opt.defaults.items() if k != "decoupled_weight_decay"}
        self.optimizer = type(opt)(params, **kwargs)
        self.generator = torch.Generator().manual_seed(0)
        self.prompt_ids, self.prompt_mask, _ = encode_prompts(self.tok, prompts)  # (B, P)
        self.response = self.sample()  # (B, R)
        self.ids = torch.cat([self.prompt_ids, self.response], 1)  # (B, P+R)
        self.mask = torch.ones_like(self.ids)  # (B, P+R)
        self.mask[:, : self.prompt_ids.shape[1]] = self.prompt_mask

    def sample(self) -> torch.Tensor:
        return sample_responses(
            self.policy.lm, self.prompt_ids, self.prompt_mask, self.args.response_tokens,
            self.tok.eos_token_id, self.tok.pad_token_id, 1.0, 0, 1.0, self.generator,
        )  # fmt: skip

    @torch.no_grad()
    def policy_forward(self):
        self.policy(self.ids, self.mask)

    @torch.no_grad()
    def ref_forward(self):
        self.ref(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=position_ids_from_mask(self.mask),
            use_cache=False,
        )

    @torch.no_grad()
    def reward_forward(self):
        # Our scorer appends one EOS to rows that never ended, so it reads P+R+1 tokens.
        B = self.ids.shape[0]
        ids = torch.cat([self.ids, torch.full((B, 1), self.tok.eos_token_id)], 1)  # (B, P+R+1)
        self.reward(ids, torch.ones_like(ids))

    def train_passes(self):
        """ppo_epochs x minibatches of forward, backward and AdamW step, with the lightest loss."""
        B, P = self.ids.shape[0], self.prompt_ids.shape[1]
        for _ in range(self.args.epochs):
            for start in range(0, B, self.minibatch):
                mb = slice(start, start + self.minibatch)
                logits, values = self.policy(self.ids[mb], self.mask[mb])  # (M, P+R, V), (M, P+R)
                logprobs = logprobs_from_logits(logits[:, P - 1 : -1], self.response[mb])  # (M, R)
                loss = -logprobs.mean() + values[:, P - 1 : -1].pow(2).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    NAMES = {
        "sample": "sampling R tokens (KV cache)",
        "policy_forward": "policy + value forward, no grad",
        "ref_forward": "reference forward, no grad",
        "reward_forward": "reward-model forward",
        "train_passes": "epochs x minibatches of fwd+bwd+AdamW",
    }

    def time_all(self, out: dict) -> None:
        for name in self.NAMES:
            t0 = CLOCK()
            getattr(self, name)()
            out.setdefault(name, []).append(CLOCK() - t0)


# ----- the run -------------------------------------------------------------------------------
def run_config(tok, config, state, prompts, args, minibatches: int) -> dict:
    import trl.experimental.ppo.ppo_trainer as trl_module

    P = encode_prompts(tok, prompts)[0].shape[1]
    warmup = 2  # updates of every path before measuring
    ours = build_ours(tok, config, state, args, minibatches)
    ours_sep = (
        build_ours(tok, config, state, args, minibatches, value_model="reward")
        if args.separate_value
        else None
    )
    passes = Passes(ours, prompts, args, minibatches)
    results = {"ours": {}, "ours_separate_value": {}, "passes": {}}

    def others(n: int, measured: bool) -> None:
        # After every TRL update: one step of ours; then alternately the passes and the other variant.
        sink = results if measured else {k: {} for k in results}
        time_ours(ours, prompts, P, sink["ours"])
        if n % 2 == 0 or not measured:
            passes.time_all(sink["passes"])
        if ours_sep is not None and (n % 2 == 1 or not measured):
            time_ours(ours_sep, prompts, P, sink["ours_separate_value"])
        if measured and n % 4 == 3:
            print(f"  {minibatches} minibatch(es), {n + 1 - warmup} updates measured: ours "
                  f"{median(results['ours']['step_s']):.3f}s  trl {median(driver.times['trl']):.3f}s  "
                  f"trl-no-gc {median(driver.times['trl_no_gc']):.3f}s", file=sys.stderr, flush=True)  # fmt: skip

    driver = Interleaver(trl_module, others, warmup)
    trl = build_trl(tok, config, state, prompts, args, minibatches, updates=warmup + 2 * args.steps)
    trl.add_callback(driver)
    with driver.patched(), contextlib.redirect_stdout(sys.stderr):  # its "===training policy==="
        trl.train()
    results["trl"] = {"step_s": driver.times["trl"], "sampled_tokens": driver.sampled}
    results["trl_no_gc"] = {"step_s": driver.times["trl_no_gc"]}
    for mode in ("trl", "trl_no_gc"):
        n = max(1, len(driver.times[mode]))
        results[mode]["gc_collect_per_update"] = driver.calls[mode][0] / n
        results[mode]["empty_cache_per_update"] = driver.calls[mode][1] / n
    if ours_sep is None:
        del results["ours_separate_value"]
    summary = {
        name: {k: median(v) for k, v in r.items() if isinstance(v, list)}
        for name, r in results.items()
    }
    summary["passes"]["sum"] = sum(summary["passes"][k] for k in Passes.NAMES)
    fastest = {name: min(r["step_s"]) for name, r in results.items() if "step_s" in r}
    fastest["passes_sum"] = sum(min(results["passes"][k]) for k in Passes.NAMES)
    optimizer = getattr(trl.optimizer, "optimizer", trl.optimizer)
    flags = {k: optimizer.defaults.get(k) for k in ("foreach", "fused")}
    return {"samples": results, "median": summary, "min": fastest, "trl_optimizer": flags}


def _goal(name: str, value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return f"- {name}: **{value:.2f}x** (goal {'>=' if at_least else '<='} {goal:g}): {'met' if met else 'MISSED'}"


def report(res: dict, minibatches: int, args) -> tuple[str, dict]:
    """The Markdown tables and the three ratios of the issue's goals (on medians)."""
    m, low, samples = res["median"], res["min"], res["samples"]
    ours, trl, nogc, passes = (
        m["ours"]["step_s"],
        m["trl"]["step_s"],
        m["trl_no_gc"]["step_s"],
        m["passes"],
    )
    ratios = {
        "trl_shipped_over_ours": trl / ours,
        "trl_no_gc_over_ours": nogc / ours,
        "ours_over_sum_of_passes": ours / passes["sum"],
    }
    unit = "s" if args.clock == "wall" else "CPU s"
    rows = [("ours (`rlhf.rl.trainer.PPOTrainer.step`)", "ours")]
    if "ours_separate_value" in m:
        rows.append(
            (
                'ours, `value_model="reward"` (a separate value net, as TRL has)',
                "ours_separate_value",
            )
        )
        ratios["trl_shipped_over_ours_separate_value"] = trl / m["ours_separate_value"]["step_s"]
    rows += [
        ("TRL 1.12.0 `PPOTrainer`, as shipped", "trl"),
        ("TRL 1.12.0, `gc.collect()` skipped", "trl_no_gc"),
    ]
    mb = f"{minibatches} minibatch{'es' if minibatches > 1 else ''} of {args.batch_size // minibatches}"
    lines = [
        f"### {args.batch_size} prompts x {args.response_tokens} tokens, {args.epochs} epochs, {mb}",
        "",
        f"| implementation | {unit} / update, median | min | median vs ours | updates timed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        t = m[key]["step_s"]
        lines.append(
            f"| {label} | {t:.3f} | {low[key]:.3f} | {t / ours:.2f}x | {len(samples[key]['step_s'])} |"
        )
    names, o = Passes.NAMES, m["ours"]
    lines += [
        "",
        f"| our step, by phase (its metrics) | {unit} | the passes it cannot avoid, each alone | {unit} |",
        "| --- | ---: | --- | ---: |",
        f"| generate (`time/generate_s`) | {o['time/generate_s']:.3f} | {names['sample']} | {passes['sample']:.3f} |",
        f"| forward (`time/forward_s`) | {o['time/forward_s']:.3f} | {names['policy_forward']}; {names['ref_forward']} "
        f"| {passes['policy_forward']:.3f} + {passes['ref_forward']:.3f} |",
        f"| score (`time/score_s`) | {o['time/score_s']:.3f} | {names['reward_forward']} | {passes['reward_forward']:.3f} |",
        f"| update (`time/update_s`) | {o['time/update_s']:.3f} | {names['train_passes']} | {passes['train_passes']:.3f} |",
        f"| step (`time/step_s`) | {o['time/step_s']:.3f} | sum | {passes['sum']:.3f} |",
        "",
        _goal("TRL as shipped / ours", ratios["trl_shipped_over_ours"], 3, True),
        _goal("TRL without its gc.collect() / ours", ratios["trl_no_gc_over_ours"], 1.5, True),
        _goal(
            "ours / sum of the unavoidable passes", ratios["ours_over_sum_of_passes"], 1.3, False
        ),
        f"- tokens sampled per update: ours {sorted(set(samples['ours']['sampled_tokens']))}, "
        f"TRL {sorted(set(samples['trl']['sampled_tokens']))}. TRL per update: "
        f"{samples['trl']['gc_collect_per_update']:g} gc.collect() "
        f"(no-ops in the skipped variant: {samples['trl_no_gc']['gc_collect_per_update']:g}), "
        f"{samples['trl']['empty_cache_per_update']:g} empty_cache(); its optimizer: AdamW {res['trl_optimizer']}.",
    ]
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=16,
        help="measured updates of each TRL variant per config (ours gets twice as many)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per update")
    parser.add_argument(
        "--response-tokens", type=int, default=24, help="tokens sampled per response"
    )
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per update")
    parser.add_argument(
        "--minibatches", default="1,4", help="comma-separated minibatch counts to run"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-separate-value", dest="separate_value", action="store_false",
                        help="skip the extra row for our separate value network")  # fmt: skip
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (use with --threads 1 on a busy machine)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        # CPU seconds of this process: robust to other load, but with more than one thread it
        # also counts the threads' spin-waits. rlhf.rl.trainer's phase timings switch clocks too.
        global CLOCK
        CLOCK = time.process_time
        import rlhf.rl.trainer

        rlhf.rl.trainer.time = types.SimpleNamespace(perf_counter=time.process_time)

    import transformers
    import trl

    tok, config, state = build_base()
    prompts = corpus.prompts(args.batch_size, seed=0)
    env = {
        "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": args.threads, "clock": args.clock, "n_parameters": sum(p.numel() for p in state.values()),
        "prompt_tokens": encode_prompts(tok, prompts)[0].shape[1], "loadavg_start": os.getloadavg(),
    }  # fmt: skip
    print(f"# PPO update: ours vs TRL {trl.__version__} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads} threads, {args.clock} clock, {os.cpu_count()} CPUs, {env['date']})\n")  # fmt: skip
    out = {"env": env, "args": vars(args), "configs": {}}
    for minibatches in (int(x) for x in args.minibatches.split(",")):
        res = run_config(tok, config, state, prompts, args, minibatches)
        if torch.get_num_threads() != args.threads:
            print(f"warning: torch threads changed to {torch.get_num_threads()}", file=sys.stderr)
        table, ratios = report(res, minibatches, args)
        print(table + "\n", flush=True)
        out["configs"][str(minibatches)] = {**res, "ratios": ratios}
    env["loadavg_end"] = os.getloadavg()
    print(
        f"load average (1, 5, 15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
