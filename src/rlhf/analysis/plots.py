"""Figures from logged metrics: read `metrics.jsonl` after a run, never from inside the loop.

- `plot_reward_kl_tradeoff`: the reward / KL trade-off of one PPO run, three panels on one step
  axis: the reward model's (proxy) score with the gold score, the KL to the reference, and the
  objective PPO maximises, reward - beta * KL.
- `plot_runs`: several runs on the same axes, one panel per metric (the reward-hacking figure).
- `plot_diagnostics`: PPO's health signals (approx. KL, clip fraction, entropy, losses, explained
  variance).
- `plot_run_dir`: what `rlhf plot RUN_DIR` writes.

Smoothing. Every series is drawn twice, the logged per-step values thin and translucent and a
debiased exponential moving average on top; the `smooth` argument is explained in `series`,
which also reads the metrics back (its `load_history`, `ema`, `REQUIRED` and `DPI` are re-exported
here).

Figures are `matplotlib.figure.Figure` objects, never pyplot's global state, so nothing leaks
between calls and no display backend is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..errors import input_error
from .series import DPI as DPI  # re-exported
from .series import REQUIRED as REQUIRED  # re-exported
from .series import (
    WINDOW,
    History,
    Source,
    _draw,
    _grid,
    _has,
    _load,
    _save,
    _series,
    _style,
    _weight,
    trailing_means,
)
from .series import ema as ema  # re-exported
from .series import load_history as load_history  # re-exported

DIAGNOSTICS = (
    "policy/approxkl",
    "policy/clipfrac",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "val/explained_variance",
)

# One colour per quantity, the same in every figure.
COLORS = {
    "objective/reward": "#1f77b4",  # blue: the proxy the policy optimises
    "objective/gold": "#2ca02c",  # green: what we actually wanted
    "objective/kl": "#d62728",  # red: distance from the reference
    "penalty": "#ff7f0e",  # orange: beta * KL, in reward units
    "objective/combined": "#7b3fa0",  # purple: reward - beta * KL
}
DIAGNOSTIC_COLOR = "#3a6f8f"

# Display name and y-axis label (with units) of each metric.
METRICS = {
    "objective/reward": ("proxy reward (reward model)", "mean RM score (normalised)"),
    "objective/gold": ("gold score", "mean gold score"),
    "objective/kl": ("KL(π ‖ π_ref)", "nats per sequence"),
    "objective/kl_penalty": ("KL penalty (estimator)", "nats per sequence"),
    "objective/combined": ("combined: reward − β·KL", "reward units"),
    "objective/kl_coef": ("KL coefficient β", "β"),
    "policy/approxkl": ("approx. KL (old → new policy)", "nats per token"),
    "policy/clipfrac": ("clip fraction", "fraction of tokens"),
    "policy/entropy": ("policy entropy", "nats per token"),
    "loss/policy": ("policy loss", "loss"),
    "loss/value": ("value loss", "loss"),
    "val/explained_variance": ("value explained variance", "1 - Var(R - V) / Var(R)"),
    "text/distinct_2": ("distinct bigrams", "distinct-2 (fraction)"),
    "text/repetition": ("repetition", "repeated-word rate"),
    "text/response_tokens": ("response length", "tokens, EOS included"),
}
_LOG_CANDIDATES = ("objective/kl", "objective/kl_penalty", "policy/approxkl")
_RUN_COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#7b3fa0",
    "#8c564b",
    "#e377c2",
    "#17becf",
)


def _name(key: str) -> str:
    return METRICS.get(key, (key, ""))[0]


# ---------------------------------------------------------------- the trade-off figure


def _beta(rows: History, kl_coef: float | None) -> tuple[float | None, str]:
    """(a constant beta or None, how to describe it in the title)."""
    if kl_coef is not None:
        return float(kl_coef), f"β = {kl_coef:g}"
    _, betas = _series(rows, "objective/kl_coef")
    if betas.size == 0:
        return None, "β not logged"
    if np.allclose(betas, betas[0], rtol=1e-6, atol=0):
        return float(betas[0]), f"β = {betas[0]:g}"
    return None, f"adaptive β: {betas[0]:.3g} → {betas[-1]:.3g}"


def _combined(rows: History, kl_coef: float | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    """reward - beta * KL per step: from `kl_coef` if given, else as logged, else from logged beta."""
    if kl_coef is None and _has(rows, "objective/combined"):
        return _series(rows, "objective/combined")
    steps, values = [], []
    for r in rows:
        beta = kl_coef if kl_coef is not None else r.get("objective/kl_coef")
        parts = (r.get("objective/reward"), r.get("objective/kl"), beta)
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in parts):
            steps.append(r["step"])
            values.append(parts[0] - parts[2] * parts[1])
    if not steps and not any(_has(rows, k) for k in ("objective/kl_coef", "objective/combined")):
        raise input_error(
            where, "has neither objective/combined nor objective/kl_coef; pass kl_coef="
        )
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def plot_reward_kl_tradeoff(
    training_history: Source,
    path: str | Path | None = None,
    kl_coef: float | None = None,
    title: str | None = None,
    smooth: float | str | None = "auto",
) -> Figure:
    """Reward, KL and reward - beta * KL against the step, three panels; saved to `path` if given.

    `training_history` is a run folder, a `metrics.jsonl` path or a list of metric dicts. The
    combined objective is the logged `objective/combined` (which uses each step's beta, adaptive
    or not); passing `kl_coef` recomputes it as reward - kl_coef * KL with that constant instead.
    """
    rows, name = _load(training_history)
    beta, beta_text = _beta(rows, kl_coef)
    with _style():
        fig = Figure(figsize=(8.5, 9), layout="constrained")
        ax_r, ax_kl, ax_c = fig.subplots(3, 1, sharex=True)

        # (1) what the policy optimises, and what we wanted
        handles = []
        for key in ("objective/reward", "objective/gold"):
            x, y = _series(rows, key)
            if y.size:
                handles.append(_draw(ax_r, x, y, COLORS[key], _name(key), smooth))
        ax_r.set_ylabel("mean score per response")
        if _has(rows, "objective/gold"):
            ax_r.set_title("Reward: proxy (reward model) vs gold", loc="left")
            _mark_gold_peak(ax_r, rows)
        else:
            ax_r.set_title("Reward: reward-model score (proxy)", loc="left")
        ax_r.legend(handles, [h.get_label() for h in handles], loc="best")

        # (2) the price: distance from the reference policy
        x, y = _series(rows, "objective/kl")
        handles = (
            [_draw(ax_kl, x, y, COLORS["objective/kl"], _name("objective/kl"), smooth)]
            if y.size
            else []
        )
        ax_kl.set_ylabel("KL (nats per sequence)")
        ax_kl.set_title("Price: KL to the reference policy", loc="left")
        if beta is not None and beta > 0:
            sec = ax_kl.secondary_yaxis("right", functions=(lambda k: k * beta, lambda p: p / beta))
            sec.set_ylabel(f"penalty β·KL (reward units, β = {beta:g})", color=COLORS["penalty"])
            sec.tick_params(axis="y", colors=COLORS["penalty"])
        elif beta is None and _has(rows, "objective/kl_coef"):
            twin = ax_kl.twinx()
            twin.grid(False)
            xp, yp = _penalty(rows)
            handles.append(_draw(twin, xp, yp, COLORS["penalty"], "penalty β·KL", smooth, "--"))
            twin.set_ylabel("penalty β·KL (reward units)", color=COLORS["penalty"])
            twin.spines["right"].set_visible(True)
        if handles:
            ax_kl.legend(handles, [h.get_label() for h in handles], loc="best")

        # (3) the objective PPO maximises
        x, y = _combined(rows, kl_coef, name or "<history>")
        line = _draw(ax_c, x, y, COLORS["objective/combined"], _name("objective/combined"), smooth)
        ax_c.set_ylabel("reward units")
        ax_c.set_title("Objective PPO maximises: reward − β·KL", loc="left")
        ax_c.set_xlabel("step")
        ax_c.legend([line], [line.get_label()], loc="best")

        head = title or f"{name + ': ' if name else ''}reward vs KL trade-off ({beta_text})"
        fig.suptitle(head, fontsize=13, fontweight="bold")
        w = _weight(smooth, len(rows))
        note = f"thin: per-step values; thick: EMA, weight {w:.2f}" if w else "per-step values"
        caption = (
            f"{note}. KL = Σ (log π − log π_ref) over the response tokens, mean over responses."
        )
        fig.supxlabel(caption, fontsize=8.5, color="0.35")
    _save(fig, path)
    return fig


def _penalty(rows: History) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        (r["step"], r["objective/kl_coef"] * r["objective/kl"])
        for r in rows
        if all(isinstance(r.get(k), (int, float)) for k in ("objective/kl_coef", "objective/kl"))
    ]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _mark_gold_peak(ax: Axes, rows: History) -> None:
    """Annotate where the gold score peaked, if it fell clearly after: reward hacking. The peak is
    that of the trailing WINDOW-step mean, as the demo report and summary.json name it (the EMA
    drawn lags by a step or two more)."""
    x, y = _series(rows, "objective/gold")
    s = np.asarray(trailing_means(list(y)))
    i = int(np.argmax(s))
    if len(s) < 5 or s[i] - s[-1] <= 0.1 * (s.max() - s.min()) or s.max() == s.min():
        return
    ax.axvline(x[i], color=COLORS["objective/gold"], lw=0.9, ls=":", alpha=0.8)
    ax.annotate(
        f"gold peaks (step {x[i]:g}, {WINDOW}-step mean)",
        (x[i], s[i]),
        xytext=(6, 8),
        textcoords="offset points",
        fontsize=8.5,
        color=COLORS["objective/gold"],
    )


# ---------------------------------------------------------------- several runs, diagnostics


def plot_runs(
    histories: Mapping[str, Source],
    path: str | Path | None = None,
    metrics: Sequence[str] = (
        "objective/reward",
        "objective/gold",
        "objective/kl",
        "text/distinct_2",
    ),
    title: str | None = None,
    smooth: float | str | None = "auto",
    log_kl: bool | str = "auto",
    colors: Mapping[str, str] | None = None,
    titles: Mapping[str, tuple[str, str]] | None = None,
) -> Figure:
    """Several runs on shared axes, one panel per metric, one colour per run (legend below).

    `titles` maps a metric to (panel title, y label), over the defaults of `METRICS`.

    A metric no run logged is skipped. KL panels switch to a symlog y-axis when the runs' KL
    scales differ by more than 30x (`log_kl="auto"`; True forces it, False never). `colors` maps
    run labels to colours, so that one run keeps its colour across figures; the others take the
    colours of `_RUN_COLORS` in order.
    """
    if not histories:
        raise ValueError("plot_runs needs at least one run")
    runs = {label: _load(src, required=())[0] for label, src in histories.items()}
    shown = [m for m in metrics if any(_has(rows, m) for rows in runs.values())]
    if not shown:
        raise input_error("<runs>", f"none of the runs logged any of {', '.join(metrics)}")
    nrows, ncols = _grid(len(shown))
    with _style():
        fig = Figure(figsize=(4.6 * ncols + 0.6, 3.4 * nrows + 0.9), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
        handles: dict[str, Line2D] = {}
        for ax, key in zip(axes, shown):
            scales = []
            for (label, rows), color in zip(runs.items(), _cycle(list(runs), colors)):
                x, y = _series(rows, key)
                if y.size:
                    handles[label] = _draw(ax, x, y, color, label, smooth)
                    scales.append(float(np.abs(y).max()))
            title_text, ylabel = {**METRICS, **(titles or {})}.get(key, (key, ""))
            if key in _LOG_CANDIDATES and _wants_log(scales, log_kl):
                ax.set_yscale("symlog", linthresh=_linthresh(scales))
                ylabel = f"{ylabel}, symlog scale" if ylabel else "symlog scale"
            ax.set_title(title_text, loc="left")
            ax.set_ylabel(ylabel)
        for ax in axes[len(shown) :]:
            ax.set_visible(False)
        for ax in axes[max(0, len(shown) - ncols) : len(shown)]:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 4), frameon=False, fontsize=10)  # fmt: skip
        if title:
            fig.suptitle(title, fontsize=13, fontweight="bold")
    _save(fig, path)
    return fig


def _cycle(labels: list[str], colors: Mapping[str, str] | None = None) -> list[str]:
    colors = colors or {}
    free = [c for c in _RUN_COLORS if c not in colors.values()] or list(_RUN_COLORS)
    picked, i = [], 0
    for label in labels:
        if label in colors:
            picked.append(colors[label])
        else:
            picked.append(free[i % len(free)])
            i += 1
    return picked


def _wants_log(scales: list[float], log_kl: bool | str) -> bool:
    if log_kl != "auto":
        return bool(log_kl)
    positive = [s for s in scales if s > 0]
    return len(positive) > 1 and max(positive) > 30 * min(positive)


def _linthresh(scales: list[float]) -> float:
    """Linear below a tenth of the smallest run's scale, rounded down to a power of ten."""
    smallest = min((s for s in scales if s > 0), default=1.0)
    return max(10 ** math.floor(math.log10(smallest / 10)), 1e-4)


def plot_diagnostics(
    training_history: Source, path: str | Path | None = None, smooth: float | str | None = "auto"
) -> Figure | None:
    """PPO's health signals (`DIAGNOSTICS`), the logged ones only; None if none was logged."""
    rows, name = _load(training_history, required=())
    shown = [k for k in DIAGNOSTICS if _has(rows, k)]
    if not shown:
        return None
    nrows, ncols = (2, 3) if len(shown) > 3 else (1, len(shown))
    with _style():
        fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
        for ax, key in zip(axes, shown):
            x, y = _series(rows, key)
            _draw(ax, x, y, DIAGNOSTIC_COLOR, _name(key), smooth)
            if key == "val/explained_variance":
                ax.axhline(0, color="0.5", lw=0.8, ls=":")
            title_text, ylabel = METRICS[key]
            ax.set_title(title_text, loc="left")
            ax.set_ylabel(ylabel)
        for ax in axes[len(shown) :]:
            ax.set_visible(False)
        for ax in axes[max(0, len(shown) - ncols) : len(shown)]:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
        fig.suptitle(
            f"{name + ': ' if name else ''}PPO training diagnostics", fontsize=13, fontweight="bold"
        )
        if "val/explained_variance" in shown:
            fig.supxlabel(
                "Explained variance near 0: the critic predicts returns no better than a constant. "
                "A value head on the policy's trunk learns only as fast as --vf-coef lets the trunk\n"
                "learn for it: on the demo's penalised run, 0.15 at steps 65-69 with --vf-coef 0.1 "
                "(the default, as TRL's) and 0.59 with 1.0 (README, PPO).",
                fontsize=8.5, color="0.35",
            )  # fmt: skip
    _save(fig, path)
    return fig


def find_runs(folder: str | Path) -> list[Path]:
    """The run folders under `folder` (any depth) whose metrics.jsonl `rlhf plot` can draw: PPO,
    SFT, reward-model and DPO runs, such as those `rlhf demo` writes. An `InputError` if none."""
    from .curves import KINDS

    folder = Path(folder)
    if not folder.is_dir():
        raise input_error(folder, "is not a folder; give the output folder of a run")
    marks = ('"objective/reward"', *(f'"{kind}/' for kind in KINDS))
    runs = []
    for metrics in sorted(folder.rglob("metrics.jsonl")):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if any(mark in first for mark in marks):
            runs.append(metrics.parent)
    if not runs:
        raise input_error(
            folder,
            "has no metrics.jsonl, and no run folder inside it has the metrics of a run; give "
            "the output folder of `rlhf ppo`, `sft`, `train-reward` or `dpo`",
        )
    return runs


def plot_run_dir(run_dir: str | Path) -> list[Path]:
    """`rlhf plot RUN_DIR`: a PPO run gets reward_kl_tradeoff.png and training_diagnostics.png,
    an SFT, reward-model or DPO run training_curves.png, written into the folder."""
    from .curves import plot_training_curves, run_kind

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise input_error(run_dir, "is not a folder; give the output folder of a run")
    rows, _ = _load(run_dir, required=())
    if run_kind(rows) != "ppo":
        path = run_dir / "training_curves.png"
        plot_training_curves(run_dir, path)
        return [path]
    written = [run_dir / "reward_kl_tradeoff.png"]
    plot_reward_kl_tradeoff(run_dir, written[0])
    if plot_diagnostics(run_dir, run_dir / "training_diagnostics.png") is not None:
        written.append(run_dir / "training_diagnostics.png")
    terms = reward_terms(rows)
    if terms != ["reward/reward_model"] and terms:  # functions or a server: each term's curve
        written.append(run_dir / "reward_terms.png")
        plot_runs(
            {run_dir.name: rows}, written[-1], metrics=("objective/reward", *terms),
            title=f"{run_dir.name}: the reward and its terms (each term's mean over the rows it scored)",
        )  # fmt: skip
    return written


def reward_terms(rows: list[dict]) -> list[str]:
    """The `reward/<name>` terms a PPO run logged (their `_std` companions left out)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return [k for k in keys if k.startswith("reward/") and not k.endswith("_std")]
