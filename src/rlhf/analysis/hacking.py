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

from .data import atomic_write_json, atomic_write_text, read_jsonl
from .ppo_train import PPORunConfig, train_ppo

WINDOW = 5
RUN_METRICS = {
    "reward": "objective/reward",
    "kl": "objective/kl",
    "gold": "objective/gold",
    "distinct_2": "text/distinct_2",
    "repetition": "text/repetition",
    "combined": "objective/combined",
}


def _window_means(values: list[float], k: int = WINDOW) -> list[float]:
    return [
        sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
        for i in range(len(values))
    ]


def summarise_run(rows: list[dict]) -> dict:
    """Final (last-window mean) and peak values of a run's metrics, and the step of the gold peak."""
    out: dict = {"steps": len(rows)}
    for name, key in RUN_METRICS.items():
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            continue
        smoothed = _window_means(values)
        out[name] = smoothed[-1]
        out[f"initial_{name}"] = values[0]
        if name in ("gold", "reward"):
            peak = max(range(len(smoothed)), key=smoothed.__getitem__)
            out[f"peak_{name}"] = smoothed[peak]
            out[f"peak_{name}_step"] = rows[peak]["step"]
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
        result = train_ppo(cfg, progress=progress)
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
        title="Reward hacking: the same PPO run with and without the KL penalty",
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


def fit_functional_form(d: list[float], r: list[float], form: str) -> tuple[float, float]:
    """Least-squares (a, b) of R(d) = d (a - b log d) for "rl" or R(d) = d (a - b d) for "bon".

    Both are linear in (a, b), so this is a two-column least-squares problem; R is the gold score
    relative to the reference policy's, so R(0) = 0 as in Gao et al.
    """
    import numpy as np

    d_arr, r_arr = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    keep = d_arr > 0
    d_arr, r_arr = d_arr[keep], r_arr[keep]
    second = -d_arr * np.log(d_arr) if form == "rl" else -(d_arr**2)
    design = np.stack([d_arr, second], axis=1)  # (N, 2)
    (a, b), *_ = np.linalg.lstsq(design, r_arr, rcond=None)
    return float(a), float(b)


def best_of_n_curve(
    lm,
    tokenizer,
    reward_model,
    judge,
    prompts: list[str],
    n_max: int,
    response_tokens: int,
    seed: int,
) -> list[dict]:
    """Best-of-n against the reference policy for n = 1, 2, 4, ... n_max.

    For each prompt n_max responses are sampled once; best-of-n keeps the first n and picks the one
    the reward model scores highest. Its KL from the reference is log n - (n - 1) / n (Stiennon et al.
    2020, appendix), exact for the analytic best-of-n distribution.
    """
    import math

    import torch

    from .generation import sample_texts
    from .models import device_of
    from .reward import score_texts

    device = device_of(lm)
    doubled = [p for p in prompts for _ in range(n_max)]
    texts, ended = sample_texts(
        lm,
        tokenizer,
        doubled,
        response_tokens,
        generator=torch.Generator(device=device).manual_seed(seed),
        device=device,
    )
    proxy = (
        score_texts(reward_model, tokenizer, doubled, texts).cpu().view(len(prompts), n_max)
    )  # (N, n_max)
    gold = torch.tensor(judge.score_batch(doubled, texts, ended)).view(
        len(prompts), n_max
    )  # (N, n_max)
    points, n = [], 1
    while n <= n_max:
        best = proxy[:, :n].argmax(1)  # (N,)
        rows = torch.arange(len(prompts))
        kl = math.log(n) - (n - 1) / n
        points.append({
            "n": n, "kl": kl, "d": math.sqrt(kl),
            "proxy": proxy[rows, best].mean().item(), "gold": gold[rows, best].mean().item(),
        })  # fmt: skip
        n *= 2
    return points


def fit_terms(a: float, b: float, term: str, digits: int = 2) -> str:
    """`a - b term` for a fitted R(d) = d (a - b term), with the sign of a negative b folded in."""
    sign = "-" if b >= 0 else "+"
    return f"{a:.{digits}f} {sign} {abs(b):.{digits}f} {term}"


def kl_sweep(
    kl_coefs: list[float],
    out: str | Path = "runs/sweep",
    steps: int = 60,
    seed: int = 0,
    base: PPORunConfig | None = None,
    bon_prompts: int = 64,
    bon_n_max: int = 64,
    progress: bool = True,
) -> dict:
    """One PPO run per KL coefficient, a best-of-n baseline, and the frontier figure `sweep.png`."""
    from .loading import load_causal_lm, load_tokenizer
    from .models import RewardModel
    from .ppo_train import default_reward_model_dir
    from .task import corpus
    from .task.default import base_model_dir
    from .task.gold import GoldJudge

    out = Path(out)
    base = base or PPORunConfig()
    if base.model is None:
        base = dataclasses.replace(
            base, model=str(base_model_dir(cache_dir=base.cache_dir, progress=progress))
        )
    if base.reward_model is None:
        base = dataclasses.replace(
            base,
            reward_model=str(
                default_reward_model_dir(base.cache_dir, progress=progress) / "reward_model"
            ),
        )
    runs = {}
    for beta in kl_coefs:
        name = f"kl_{beta:g}"
        train_ppo(
            dataclasses.replace(
                base, out=str(out / name), kl_coef=beta, steps=steps, seed=seed, adaptive_kl=False
            ),
            progress=progress,
        )
        rows = read_jsonl(out / name / "metrics.jsonl")
        kl = _window_means([max(r["objective/kl"], 0.0) for r in rows])
        gold = _window_means([r["objective/gold"] for r in rows])
        proxy = _window_means([r["objective/reward"] for r in rows])
        runs[name] = {"kl_coef": beta, "d": [k**0.5 for k in kl], "gold": gold, "proxy": proxy}
    gold_0 = sum(r["gold"][0] for r in runs.values()) / len(runs)
    proxy_0 = sum(r["proxy"][0] for r in runs.values()) / len(runs)
    all_d = [d for r in runs.values() for d in r["d"]]
    all_gold = [g - gold_0 for r in runs.values() for g in r["gold"]]
    rl_fit = fit_functional_form(all_d, all_gold, "rl")

    lm, tokenizer = load_causal_lm(base.model), load_tokenizer(base.model)
    rm = RewardModel.from_pretrained(base.reward_model)
    bon = best_of_n_curve(
        lm,
        tokenizer,
        rm,
        GoldJudge(),
        corpus.prompts(bon_prompts, seed=seed + 7, split="train"),
        bon_n_max,
        base.response_tokens,
        seed,
    )
    bon_fit = fit_functional_form(
        [p["d"] for p in bon], [p["gold"] - bon[0]["gold"] for p in bon], "bon"
    )
    result = {
        "kl_coefs": kl_coefs, "steps": steps, "runs": runs, "best_of_n": bon,
        "gold_at_reference": gold_0, "proxy_at_reference": proxy_0,
        "fit_rl": {"form": "R(d) = d (a - b log d)", "a": rl_fit[0], "b": rl_fit[1]},
        "fit_bon": {"form": "R(d) = d (a - b d)", "a": bon_fit[0], "b": bon_fit[1]},
    }  # fmt: skip
    atomic_write_json(out / "sweep.json", result)
    plot_frontier(result, out / "sweep.png")
    return result


def plot_frontier(result: dict, path: Path) -> None:
    """Gold and proxy score against d = sqrt(KL) for every run, best-of-n, and the fitted forms."""
    import numpy as np
    from matplotlib.figure import Figure

    from .data import atomic_write

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_gold, ax_proxy = fig.subplots(1, 2)
    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
    gold_0, proxy_0 = result["gold_at_reference"], result["proxy_at_reference"]
    d_max = 0.0
    for color, run in zip(colors * 3, result["runs"].values()):
        label = f"PPO, kl_coef={run['kl_coef']:g}"
        ax_gold.plot(
            run["d"],
            [g - gold_0 for g in run["gold"]],
            "o-",
            ms=2.5,
            lw=1,
            alpha=0.8,
            color=color,
            label=label,
        )
        ax_proxy.plot(
            run["d"],
            [p - proxy_0 for p in run["proxy"]],
            "o-",
            ms=2.5,
            lw=1,
            alpha=0.8,
            color=color,
            label=label,
        )
        d_max = max(d_max, max(run["d"]))
    bon = result["best_of_n"]
    ax_gold.plot(
        [p["d"] for p in bon],
        [p["gold"] - bon[0]["gold"] for p in bon],
        "ks--",
        ms=5,
        label=f"best-of-n (n = 1 ... {bon[-1]['n']})",
    )
    ax_proxy.plot(
        [p["d"] for p in bon],
        [p["proxy"] - bon[0]["proxy"] for p in bon],
        "ks--",
        ms=5,
        label="best-of-n",
    )
    grid = np.linspace(1e-3, d_max, 200)
    a, b = result["fit_rl"]["a"], result["fit_rl"]["b"]
    ax_gold.plot(
        grid,
        grid * (a - b * np.log(grid)),
        color="black",
        lw=2.2,
        alpha=0.6,
        label=f"fit to PPO: d ({fit_terms(a, b, 'log d')})",
    )
    a, b = result["fit_bon"]["a"], result["fit_bon"]["b"]
    bon_grid = np.linspace(1e-3, bon[-1]["d"], 100)
    ax_gold.plot(
        bon_grid,
        bon_grid * (a - b * bon_grid),
        color="gray",
        lw=1.5,
        ls=":",
        label=f"fit to best-of-n: d ({fit_terms(a, b, 'd')})",
    )
    for ax, what in (
        (ax_gold, "gold score (the judge)"),
        (ax_proxy, "proxy score (the reward model)"),
    ):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("d = sqrt(KL(π ‖ π_ref)), sqrt(nats)")
        ax.set_ylabel(f"{what}, relative to the reference policy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_gold.set_title("What we wanted: the gold score")
    ax_proxy.set_title("What PPO optimised: the proxy score")
    fig.suptitle(
        "Reward-KL frontier (functional forms of Gao, Schulman and Hilton 2022)", fontweight="bold"
    )
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
