"""`rlhf sweep`: the reward-KL frontier, one PPO run per KL coefficient plus a best-of-n baseline,
with the functional forms of Gao, Schulman and Hilton (2022) fitted to the gold curve.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import atomic_write_json, read_jsonl
from ..rl.config import PPORunConfig
from ..rl.run import train_ppo
from .hacking import window_means


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

    from ..models.forward import device_of
    from ..models.generation import sample_texts
    from ..reward.loss import score_texts

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
    from ..models.loading import load_causal_lm, load_tokenizer
    from ..models.reward_model import RewardModel
    from ..rl.inputs import default_reward_model_dir
    from ..task import corpus
    from ..task.default import base_model_dir
    from ..task.gold import GoldJudge

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
        kl = window_means([max(r["objective/kl"], 0.0) for r in rows])
        gold = window_means([r["objective/gold"] for r in rows])
        proxy = window_means([r["objective/reward"] for r in rows])
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

    from ..data import atomic_write

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
