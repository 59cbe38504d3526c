"""The figure of `rlhf sweep`: one panel per method, and every method's best setting together.

A method with a defence (`rlhf sweep --defences`, such as `gae-min`) is a method of its own here:
its own panel and its own curve on the summary panel, in the defence's colour.

Each curve is a mean over seeds, with a band of one standard deviation over seeds; the x axis is
d = sqrt(KL(pi || pi_ref)) and the scores are relative to the reference policy's. Gold is solid,
the proxy (the reward model's score, in its own units) dotted; the fitted functional form of Gao
et al. (2022) is the dashed black line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..data import atomic_write
from .defences import DEFENCE_COLORS, DEFENCE_LABELS
from .sweep import fit_terms

LABELS = {
    "gae": "PPO (GAE, value head)",
    "rloo": "RLOO",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "reinforce_pp": "REINFORCE++",
    "dpo": "DPO",
    "best_of_n": "best-of-n",
}
METHOD_COLORS = {
    "gae": "#1f77b4",
    "rloo": "#d62728",
    "grpo": "#2ca02c",
    "dr_grpo": "#9467bd",
    "reinforce_pp": "#ff7f0e",
    "dpo": "#8c564b",
    "best_of_n": "#222222",
}


def entry_label(name: str, entry: dict) -> str:
    """A sweep.json method's label: the method's, plus its defence's when it has one."""
    method, defence = entry.get("method", name), entry.get("defence", "none")
    label = LABELS[method]
    return label if defence == "none" else f"{label} + {DEFENCE_LABELS[defence]}"


def entry_color(name: str, entry: dict) -> str:
    defence = entry.get("defence", "none")
    return (
        METHOD_COLORS[entry.get("method", name)] if defence == "none" else DEFENCE_COLORS[defence]
    )


def _shades(color: str, n: int) -> list[tuple[float, float, float]]:
    """n shades of one colour, light (small coefficient) to dark (large)."""
    import matplotlib.colors as mcolors

    r, g, b = mcolors.to_rgb(color)
    out = []
    for i in range(n):
        t = 0.35 + 0.65 * (i + 1) / n if n > 1 else 1.0
        out.append((1 - t + t * r, 1 - t + t * g, 1 - t + t * b))
    return out


def _curve(ax, s: dict, color, label: str, proxy: bool = True) -> float:
    d = np.asarray(s["d"])
    gold0 = s["gold"][0]
    gold = np.asarray(s["gold"]) - gold0
    std = np.asarray(s["gold_std"])
    if len(d) == 2:  # one measured point (DPO: the trained policy against its reference)
        ax.errorbar(
            d[1:], gold[1:], yerr=std[1:], fmt="o", color=color, ms=6, capsize=3, label=label
        )
        return float(d.max())
    marker = "o" if len(d) <= 8 else None
    ax.plot(d, gold, "-", color=color, lw=1.6, marker=marker, ms=4, label=label)
    if len(s.get("per_seed", [])) > 1:
        ax.fill_between(d, gold - std, gold + std, color=color, alpha=0.18, lw=0)
    if proxy and "proxy" in s:
        ax.plot(d, np.asarray(s["proxy"]) - s["proxy"][0], ":", color=color, lw=1.1)
    return float(d.max()) if len(d) else 0.0


def _fit_line(ax, fit: dict, d_max: float, bon: bool) -> None:
    grid = np.linspace(1e-3, max(d_max, 1e-2), 200)
    a, b = fit["a"], fit["b"]
    y = grid * (a - b * (grid if bon else np.log(grid)))
    form = fit_terms(a, b, "d" if bon else "log d")
    ax.plot(
        grid, y, "--", color="black", lw=1.2, alpha=0.7, label=f"d ({form}), R² = {fit['r2']:.2f}"
    )


def plot_methods(result: dict, path: str | Path) -> None:
    methods = result["methods"]
    n = len(methods) + 1
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    summary_ax = axes[0]
    for ax, (key, entry) in zip(axes[1:], methods.items()):
        method = entry.get("method", key)
        color_of, label_of = entry_color(key, entry), entry_label(key, entry)
        settings = list(entry["settings"].values())
        d_max = 0.0
        for color, (name, s) in zip(_shades(color_of, len(settings)), entry["settings"].items()):
            label = (
                f"n ≤ {name or s['n'][-1]}" if method == "best_of_n" else f"{entry['knob']} {name}"
            )
            d_max = max(d_max, _curve(ax, s, color, label))
        _fit_line(ax, entry["fit"], d_max, bon=method == "best_of_n")
        # A method with a defence ("PPO (GAE, value head) + ensemble min") on two lines: one
        # would run into the next panel's title.
        ax.set_title(label_of.replace(" + ", "\n+ "), fontsize=11, fontweight="bold")
        best = entry["peak"]
        if method != "best_of_n":  # the best setting's curve, on the summary panel
            s = entry["settings"][best["setting"]]
            _curve(
                summary_ax,
                s,
                color_of,
                f"{label_of} ({entry['knob']} {best['setting']})",
                proxy=False,
            )
        else:
            _curve(summary_ax, settings[0], color_of, label_of, proxy=False)
    summary_ax.set_title("Each method at its best setting (gold)", fontsize=11, fontweight="bold")
    for ax in axes[:n]:
        ax.axhline(0, color="gray", lw=0.7)
        ax.set_xlabel("d = sqrt(KL to the reference), sqrt(nats)")
        ax.set_ylabel("score − reference's")
        ax.grid(alpha=0.3)
        if ax is summary_ax:  # many curves: the legend goes under the panel
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        else:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    seeds = len(result["seeds"])
    fig.suptitle(
        f"Gold (solid, band: ±1 std over {seeds} seed{'s' * (seeds > 1)}) and proxy (dotted) "
        "against d; dashed: Gao et al. (2022) forms",
        fontsize=11,
    )
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
