"""What `rlhf eval` shows, from what eval.json holds: the terminal's table, and eval.png (the win
rates as wins, ties and losses with their intervals, then each quantity per prompt, policy against
baseline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .series import _grid, _save, _style

POLICY_COLOR = "#1f77b4"  # blue, as the proxy reward in the training figures
BASELINE_COLOR = "#7f7f7f"  # grey: where the policy started
TIE_COLOR = "#d9d9d9"

PANELS = (
    ("reward", "reward model score", "score (normalised: reference samples mean 0, std 1)"),
    ("gold", "gold score", "gold score"),
    ("kl", "KL to the reference", "nats per sequence (k1)"),
    ("tokens", "response length", "tokens (EOS included)"),
)


def _win_panel(ax, result: dict) -> None:
    bars = [(k, name) for k, name in (("win_rate", "reward model"), ("gold_win_rate", "gold judge"))
            if result.get(k)]  # fmt: skip
    for y, (key, _name) in enumerate(bars):
        w = result[key]
        n = w["n"]
        left = 0.0
        for count, color, label in ((w["wins"], POLICY_COLOR, "policy wins"),
                                    (w["ties"], TIE_COLOR, "tie"),
                                    (w["losses"], BASELINE_COLOR, "baseline wins")):  # fmt: skip
            ax.barh(
                y, count / n, left=left, height=0.5, color=color, label=label if y == 0 else None
            )
            left += count / n
        ax.errorbar(
            w["rate"],
            y,
            xerr=[[w["rate"] - w["low"]], [w["high"] - w["rate"]]],
            fmt="o",
            color="black",
            capsize=4,
            label="win rate, 95% CI" if y == 0 else None,
        )
        ax.annotate(f"{100 * w['rate']:.1f}%", (w["rate"], y + 0.27), ha="center", va="bottom",
                    fontsize=9)  # fmt: skip
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_yticks(range(len(bars)), [name for _, name in bars])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, len(bars) - 0.1)
    ax.set_xlabel("share of prompts (ties count half in the win rate)")
    ax.set_title("policy vs baseline")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)


def _values(rows: list[dict], key: str, side: str) -> list[float] | None:
    name = f"{side}_{key}"
    if not rows or name not in rows[0]:
        return None
    return [row[name] for row in rows]


def _hist_panel(ax, rows: list[dict], key: str, title: str, xlabel: str) -> None:
    series = [
        (side, _values(rows, key, side), color)
        for side, color in (("policy", POLICY_COLOR), ("baseline", BASELINE_COLOR))
    ]
    values = np.concatenate([v for _, v, _ in series if v is not None])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
    for side, v, color in series:
        if v is None or (key == "kl" and side == "baseline" and not any(v)):
            continue  # the reference's KL to itself is 0: no histogram to draw
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=color)
        ax.hist(v, bins=bins, histtype="step", color=color, linewidth=1.2)
        mean = float(np.mean(v))
        ax.axvline(
            mean, color=color, linestyle="--", linewidth=1.2, label=f"{side}: mean {mean:.2f}"
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)


def plot_eval(result: dict, path: str | Path | None = None) -> Figure:
    """The figure of one evaluation (`result` as eval.json holds it), saved to `path` if given."""
    rows = result["per_prompt"]
    panels = [p for p in PANELS if _values(rows, p[0], "policy") is not None]
    with_wins = bool(result.get("win_rate") or result.get("gold_win_rate"))
    n = len(panels) + with_wins
    nrows, ncols = _grid(n)
    with _style():
        fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        at = 0
        if with_wins:
            _win_panel(axes[0], result)
            at = 1
        for ax, (key, title, xlabel) in zip(axes[at:], panels):
            _hist_panel(ax, rows, key, title, xlabel)
        for ax in axes[n:]:
            ax.set_visible(False)
        fig.suptitle(
            f"{result['models']['policy']}\nagainst {result['models']['baseline']}, "
            f"{len(rows)} prompts", fontsize=9,
        )  # fmt: skip
        _save(fig, path)
    return fig


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.{ {'tokens': 1, 'kl': 2}.get(kind, 3) }f}"


def format_table(result: dict) -> str:
    """The terminal's table, policy against baseline, one row per metric, then the win rates."""
    base = "baseline (reference)" if result["models"]["baseline_is_reference"] else "baseline"
    rows = [
        ("reward (reward model)", "reward", "num"), ("gold score", "gold", "num"),
        ("KL to reference (nats)", "kl", "kl"), ("response tokens", "response_tokens", "tokens"),
        ("ended with EOS", "eos_rate", "pct"), ("distinct-2", "distinct_2", "num"),
    ]  # fmt: skip
    rows = [
        r
        for r in rows
        if result["policy"][r[1]] is not None or result["baseline"][r[1]] is not None
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':{width}}{'policy':>12}  {base:>20}"]
    for label, key, kind in rows:
        a, b = _fmt(result["policy"][key], kind), _fmt(result["baseline"][key], kind)
        lines.append(f"{label:{width}}{a:>12}  {b:>20}")
    n = result["policy"]["n"]
    for key, judge in (("win_rate", "the reward model"), ("gold_win_rate", "the gold judge")):
        w = result.get(key)
        if w:
            lines.append(
                f"win rate under {judge}: {100 * w['rate']:.1f}% [{100 * w['low']:.1f}%, "
                f"{100 * w['high']:.1f}%] ({w['wins']} wins, {w['ties']} ties, {w['losses']} "
                f"losses over {n} prompts; 95% Wilson interval, ties count half)"
            )
    if result.get("win_rate") is None:
        lines.append("no reward model, so no win rate: give one with --reward-model DIR")
    return "\n".join(lines)
