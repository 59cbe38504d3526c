"""`rlhf demo --task arithmetic`: the seed's lesson on a task whose gold judge is exact.

A small model pretrained on sums (`task.arithmetic_model`) answers held-out problems with partial
accuracy. Three GRPO runs on the same prompts, seed and budget:
- `strict`: the strict verifier (exactly the right number) as the reward, with the KL penalty;
  held-out accuracy rises;
- `with_kl` and `no_kl`: the lenient verifier ("the right number appears anywhere") as the proxy
  reward, with and without the KL penalty. Without it the policy learns to write many numbers per
  answer: the proxy rises while strict accuracy, the gold score here, falls.
Writes the runs' folders, hacking.png, arithmetic.png, summary.json and report.md to `out`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..data import atomic_write_json, atomic_write_text, read_jsonl
from ..rl.config import PPORunConfig
from ..rl.run import train_ppo
from .hacking import RUN_COLORS, demonstrate_reward_hacking, summarise_run

LENIENT = "rlhf.task.arithmetic:lenient_reward"
LENIENT_KL = 1.0
"""the penalised lenient run's kl_coef: 0.1, the review task's, only slowed the gaming here
(strict accuracy 0.28 -> 0.10 in 150 steps; benchmarks/arithmetic_check.py), 1.0 held it"""
TITLES = {
    "objective/reward": ("reward (the run's verifier)", "share of answers it accepts"),
    "objective/gold": ("strict accuracy (gold)", "share exactly right, training problems"),
}


def arithmetic_base(
    quick: bool, seed: int, device: str, report_to: str
) -> tuple[PPORunConfig, int]:
    """The GRPO options every run shares, and the steps per run."""
    cfg = PPORunConfig(
        task="arithmetic", advantage_estimator="grpo", samples_per_prompt=8, batch_size=16,
        minibatch_size=64, ppo_epochs=2, response_tokens=16, lr=1e-4, kl_coef=0.1,
        sample_every=5, seed=seed, device=device, report_to=report_to,
    )  # fmt: skip
    # lr 1e-4: at 3e-4 (or 4 epochs) the strict runs of benchmarks/arithmetic_check.py lost
    # accuracy; at 1e-4 GRPO went from 0.28 to 0.36 in 150 steps.
    return cfg, (8 if quick else 100)


def held_out(run_dir: Path, seed: int) -> dict:
    """Strict and lenient accuracy of a run's final policy on 256 held-out problems."""
    from ..models.loading import load_causal_lm, load_tokenizer
    from ..task.arithmetic_model import evaluate

    model = load_causal_lm(run_dir / "policy").eval()
    return evaluate(model, load_tokenizer(run_dir / "policy"), n=256, seed=seed)


def run_arithmetic_demo(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    cache_dir=None,
    device: str = "auto",
    progress: bool = True,
    report_to: str = "tensorboard",
) -> dict:
    """Run the arithmetic story and write its report into `out` (default runs/demo-arithmetic)."""
    from ..task.arithmetic_model import arithmetic_model_dir, arithmetic_model_info
    from .plots import plot_run_dir, plot_runs

    start = time.perf_counter()
    out_dir = Path(out or ("runs/demo-arithmetic-quick" if quick else "runs/demo-arithmetic"))
    t0 = time.perf_counter()
    model_dir = arithmetic_model_dir(cache_dir=cache_dir, progress=progress)
    info = arithmetic_model_info(model_dir)
    timings = {"base_model_s": time.perf_counter() - t0}
    print(
        f"base model: {model_dir}\n  held-out strict accuracy {info['heldout_strict_accuracy']:.3f}"
        f" at temperature 1 ({info['heldout_strict_accuracy_greedy']:.3f} greedy), lenient "
        f"{info['heldout_lenient_accuracy']:.3f}"
    )
    base, steps = arithmetic_base(quick, seed, device, report_to)
    base = dataclasses.replace(base, model=str(model_dir), cache_dir=cache_dir)

    t0 = time.perf_counter()
    strict_dir = out_dir / "strict"
    train_ppo(
        dataclasses.replace(base, out=str(strict_dir), steps=steps), progress=progress,
        label="GRPO on the strict verifier (kl_coef 0.1)",
    )  # fmt: skip
    plot_run_dir(strict_dir)
    comparison = demonstrate_reward_hacking(
        out_dir, steps=steps, kl_coef=LENIENT_KL, seed=seed, progress=progress,
        base=dataclasses.replace(base, reward_fn=[LENIENT]), titles=TITLES,
    )  # fmt: skip
    timings["runs_s"] = time.perf_counter() - t0
    names = {
        "strict": f"strict reward, kl_coef {base.kl_coef:g}",
        "with_kl": f"lenient reward, kl_coef {LENIENT_KL:g}",
        "no_kl": "lenient reward, no KL",
    }
    colors = {names["strict"]: "#2ca02c", names["with_kl"]: RUN_COLORS["with_kl"],
              names["no_kl"]: RUN_COLORS["no_kl"]}  # fmt: skip
    plot_runs(
        {names[n]: out_dir / n / "metrics.jsonl" for n in names},
        path=out_dir / "arithmetic.png",
        metrics=("objective/reward", "objective/gold", "objective/kl", "text/response_tokens"),
        title="GRPO on sums: the reward it was given, and strict accuracy (gold)",
        colors=colors,
        titles=TITLES,
    )
    before = {k.removeprefix("heldout_").removesuffix("_accuracy"): v for k, v in info.items()
              if k in ("heldout_strict_accuracy", "heldout_lenient_accuracy")}  # fmt: skip
    runs = {}
    for name in names:
        rows = read_jsonl(out_dir / name / "metrics.jsonl")
        runs[name] = {
            "verifier": "strict" if name == "strict" else "lenient",
            "kl_coef": {"strict": base.kl_coef, "with_kl": LENIENT_KL, "no_kl": 0.0}[name],
            "held_out": held_out(out_dir / name, seed),
            **summarise_run(rows),  # reward, kl, gold: means of the last 5 steps; their peaks
        }
        if name in comparison["runs"]:
            runs[name]["hacking_step"] = comparison["runs"][name].get("hacking_step")
    timings["total_s"] = time.perf_counter() - start
    summary = {
        "task": "arithmetic", "quick": quick, "seed": seed, "steps": steps,
        "base_model": {"dir": str(model_dir), "held_out": before,
                       **{k: info[k] for k in ("n_parameters", "train_seconds")}},
        "runs": runs, "seconds": {k: round(v, 1) for k, v in timings.items()},
    }  # fmt: skip
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", arithmetic_report(summary, names))
    print(
        f"done in {timings['total_s']:.0f} s. Open {out_dir / 'report.md'}; numbers in "
        f"{out_dir / 'summary.json'}"
    )
    return summary


def arithmetic_report(summary: dict, names: dict[str, str]) -> str:
    """report.md: what each run was rewarded for and what it learned, judged exactly."""
    base = summary["base_model"]["held_out"]
    rows = [
        f"| base model | - | - | {base['strict']:.3f} | {base['lenient']:.3f} | - |",
    ]
    for name, label in names.items():
        run = summary["runs"][name]
        h = run["held_out"]
        rows.append(
            f"| {label} | {run['reward']:.3f} | {run['kl']:.2f} "
            f"| {h['strict']:.3f} | {h['lenient']:.3f} | {h['numbers_per_answer']:.2f} |"
        )
    no_kl, strict = summary["runs"]["no_kl"], summary["runs"]["strict"]
    gamed = no_kl["held_out"]["lenient"] > no_kl["held_out"]["strict"]
    fell = no_kl["held_out"]["strict"] < base["strict"]
    rose = strict["held_out"]["strict"] > base["strict"]
    lesson = (
        "Without the KL penalty the lenient verifier was gamed: the policy writes "
        f"{no_kl['held_out']['numbers_per_answer']:.1f} numbers per answer, so the right one is "
        f"often among them (lenient {no_kl['held_out']['lenient']:.3f}) while the answer itself is "
        f"right less often (strict {no_kl['held_out']['strict']:.3f}, from {base['strict']:.3f})."
        if gamed and fell
        else "In this run the lenient verifier was not gamed by the end (strict accuracy did not "
        "fall below the base model's); more steps or a larger learning rate show it."
    )
    verified = (
        f"Rewarded by the strict verifier, held-out accuracy rose from {base['strict']:.3f} to "
        f"{strict['held_out']['strict']:.3f}."
        if rose
        else f"Rewarded by the strict verifier, held-out accuracy did not rise in "
        f"{summary['steps']} steps ({base['strict']:.3f} -> {strict['held_out']['strict']:.3f})."
    )
    with_kl = summary["runs"]["with_kl"]
    penalised = (
        f" With the KL penalty (kl_coef {with_kl['kl_coef']:g}) the same proxy left held-out strict "
        f"accuracy at {with_kl['held_out']['strict']:.3f}, with "
        f"{with_kl['held_out']['numbers_per_answer']:.1f} numbers per answer, at a KL of "
        f"{with_kl['kl']:.2f} nats against {no_kl['kl']:.2f} without it."
    )
    return f"""# Reward hacking on a verifiable task (`rlhf demo --task arithmetic`)

Seed {summary["seed"]}, {summary["steps"]} GRPO steps per run (16 problems x 8 samples, lr 1e-4),
{summary["seconds"]["total_s"]:.0f} s in all. The base model
({summary["base_model"]["n_parameters"]:,} parameters) was pretrained on sums such as `12+7=19`; the
gold score is strict accuracy: the answer is exactly the right number. The lenient verifier, the
proxy, accepts any answer in which the right number appears.

| run | reward, last 5 steps | KL (nats) | held-out strict | held-out lenient | numbers per answer |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Held-out: 256 problems never seen in pretraining or training, one sample each at temperature 1.

{verified} {lesson}{penalised}

![runs](arithmetic.png)

![with and without the KL penalty](hacking.png)

Responses of the lenient runs to the same problems: [examples.md](examples.md). Each run's folder
has its metrics, samples and figures (`rlhf plot`).
"""
