"""Reward hacking made visible: the same PPO run with and without the KL penalty (the seed's task 5).

The gold judge labelled the preference data but the policy never sees it; the proxy (the reward
model) is all PPO optimises. Without the KL penalty the policy drifts far from the reference and
finds text the reward model over-rates: the proxy keeps rising while the gold score falls.

"Final" numbers are means over the last `WINDOW` steps and "peak" numbers the largest such mean,
so that one noisy batch does not decide them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import atomic_write_json, atomic_write_text, read_jsonl
from ..rl.config import METHOD_NAMES, PPORunConfig
from ..rl.run import train_ppo
from .series import trailing_means

# One colour per demo run, the same in every figure (hacking.png, kl_coefs.png).
RUN_COLORS = {"with_kl": "#1f77b4", "no_kl": "#d62728", "large_kl": "#2ca02c"}
RUN_METRICS = {
    "reward": "objective/reward",
    "kl": "objective/kl",
    "gold": "objective/gold",
    "distinct_2": "text/distinct_2",
    "repetition": "text/repetition",
    "combined": "objective/combined",
}


def summarise_run(rows: list[dict]) -> dict:
    """Final (last-window mean) and peak values of a run's metrics, and the step of the gold peak."""
    out: dict = {"steps": len(rows)}
    for name, key in RUN_METRICS.items():
        logged = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not logged:
            continue
        steps, values = zip(*logged)
        smoothed = trailing_means(list(values))
        out[name] = smoothed[-1]
        out[f"initial_{name}"] = values[0]
        if name in ("gold", "reward"):
            peak = max(range(len(smoothed)), key=smoothed.__getitem__)
            out[f"peak_{name}"] = smoothed[peak]
            out[f"peak_{name}_step"] = steps[peak]
    return out


def side_by_side_examples(
    run_dirs: dict[str, Path], steps: list[int], per_step: int = 3
) -> list[dict]:
    """Responses of each run to the same prompts at the same steps (runs share the prompt stream)."""
    samples = {name: read_jsonl(Path(d) / "samples.jsonl") for name, d in run_dirs.items()}
    examples = []
    for step in steps:
        by_run = {
            name: [s for s in rows if s["step"] == step][:per_step]
            for name, rows in samples.items()
        }
        for i in range(min(len(v) for v in by_run.values())):
            row = {"step": step, "prompt": next(iter(by_run.values()))[i]["prompt"]}
            for name, rows in by_run.items():
                row[name] = {k: rows[i].get(k) for k in ("response", "reward", "gold", "kl")}
            examples.append(row)
    return examples


def demonstrate_reward_hacking(
    out: str | Path = "runs/hacking",
    steps: int = 100,
    kl_coef: float = 0.1,
    seed: int = 0,
    base: PPORunConfig | None = None,
    progress: bool = True,
    titles: dict | None = None,
) -> dict:
    """Train one policy with `kl_coef` and one with 0, same base, reward model, seed and budget.

    Writes `with_kl/` and `no_kl/` run folders, `hacking.png` (both runs on proxy reward, gold,
    KL and distinct-2), `comparison.json` and returns the comparison: per run the final and peak
    metrics, and example outputs side by side at the same steps. `base` carries every other PPO
    option (model, reward model, lr, batch size...).
    """
    from .plots import plot_run_dir, plot_runs

    out = Path(out)
    base = base or PPORunConfig()
    runs = {"with_kl": kl_coef, "no_kl": 0.0}
    run_dirs, summaries, warnings = {}, {}, {}
    for name, beta in runs.items():
        cfg = dataclasses.replace(
            base, out=str(out / name), kl_coef=beta, steps=steps, seed=seed, adaptive_kl=False
        )
        method = METHOD_NAMES[cfg.advantage_estimator]
        what = f"{method} with the KL penalty" if beta else f"{method} without the KL penalty"
        result = train_ppo(cfg, progress=progress, label=f"{what} (kl_coef {beta:g})")
        run_dirs[name] = out / name
        summaries[name] = {
            "kl_coef": beta,
            **summarise_run(read_jsonl(out / name / "metrics.jsonl")),
        }
        summaries[name]["hacking_step"] = result["hacking_step"]
        warnings[name] = result["hacking_warning"]
        plot_run_dir(out / name)
    label = {name: f"{name.replace('_', ' ')} (kl_coef={beta:g})" for name, beta in runs.items()}
    plot_runs(
        {label[n]: run_dirs[n] / "metrics.jsonl" for n in runs},
        path=out / "hacking.png",
        title=f"Reward hacking: the same {METHOD_NAMES[base.advantage_estimator]} run with and "
        "without the KL penalty",
        colors={label[n]: RUN_COLORS[n] for n in runs},
        titles=titles,
    )
    example_steps = sorted({0, steps // 2, steps - 1})
    comparison = {
        "runs": summaries,
        "examples": side_by_side_examples(run_dirs, example_steps),
        "figure": str(out / "hacking.png"),
    }
    atomic_write_json(out / "comparison.json", comparison)
    atomic_write_text(out / "examples.md", examples_markdown(comparison["examples"], list(runs)))
    return comparison


def examples_markdown(examples: list[dict], run_names: list[str]) -> str:
    """A Markdown table of the runs' responses to the same prompts."""
    head = (
        "| Step | Prompt | "
        + " | ".join(run_names)
        + " |\n|---|---|"
        + "---|" * len(run_names)
        + "\n"
    )
    lines = []
    for ex in examples:
        cells = []
        for name in run_names:
            r = ex[name]
            gold = "" if r.get("gold") is None else f", gold {r['gold']:.2f}"
            cells.append(
                f"{_escape(r['response'])} <br>*(reward {r['reward']:.2f}{gold}, KL {r['kl']:.1f})*"
            )
        lines.append(f"| {ex['step']} | {_escape(ex['prompt'])} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# The reward-KL frontier (Gao, Schulman and Hilton 2022, "Scaling laws for reward model
# overoptimization"): gold and proxy reward against d = sqrt(KL(pi || pi_ref)).
# --------------------------------------------------------------------------------------------
