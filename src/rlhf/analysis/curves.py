"""Training curves of the runs that are not PPO: `rlhf sft`, `rlhf train-reward` and `rlhf dpo`.

One panel per quantity, the per-step training values drawn as in every figure (thin raw values,
EMA on top; `series`) and the held-out evaluations, which are few, as points joined by a dashed
line. `run_kind` tells a run's kind from the names it logged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import input_error
from .series import History, Source, _draw, _grid, _load, _save, _series, _style

TRAIN, HELD_OUT, OTHER = "#3a6f8f", "#d62728", "#2ca02c"

# kind: (title, x-axis label, panels); a panel is (title, y label, [(metric, label), ...]), and a
# metric whose name holds "eval_" is a held-out evaluation.
KINDS = {
    "sft": ("SFT", "optimizer step", [
        ("Loss", "cross-entropy per trained token",
         [("sft/loss", "training batch"), ("sft/eval_loss", "held-out")]),
        ("Token accuracy", "argmax = next token",
         [("sft/token_accuracy", "training batch"), ("sft/eval_token_accuracy", "held-out")]),
        ("Gradient norm", "before clipping to 1", [("sft/grad_norm", "global norm")]),
        ("Learning rate", "AdamW lr", [("sft/lr", "lr")]),
    ]),
    "reward": ("reward model", "optimizer step", [
        ("Bradley-Terry loss", "−log σ(r_chosen − r_rejected)",
         [("reward/loss", "training batch"), ("reward/eval_loss", "held-out")]),
        ("Accuracy", "share of pairs where chosen scores higher",
         [("reward/accuracy", "training batch"), ("reward/eval_accuracy", "held-out")]),
        ("Margin", "r_chosen − r_rejected", [("reward/margin", "training batch")]),
        ("Learning rate", "AdamW lr", [("reward/lr", "lr")]),
    ]),
    "dpo": ("DPO", "optimizer step", [
        ("Loss", "DPO (or IPO) loss", [("dpo/loss", "training batch"), ("dpo/eval_loss", "held-out")]),
        ("Implicit-reward accuracy", "share of pairs where chosen scores higher",
         [("dpo/accuracy", "training batch"), ("dpo/eval_accuracy", "held-out")]),
        ("Implicit rewards", "β · log π/π_ref, summed over the response",
         [("dpo/chosen_reward", "chosen"), ("dpo/rejected_reward", "rejected")]),
        ("Margin", "chosen − rejected implicit reward", [("dpo/margin", "training batch")]),
    ]),
}  # fmt: skip


def run_kind(rows: History) -> str | None:
    """ "ppo", "sft", "reward" or "dpo", from the metrics a run logged; None for none of these."""
    keys = {k for r in rows for k in r}
    if "objective/reward" in keys:
        return "ppo"
    return next((kind for kind in KINDS if any(k.startswith(f"{kind}/") for k in keys)), None)


def plot_training_curves(
    source: Source, path: str | Path | None = None, smooth: float | str | None = "auto"
) -> Figure:
    """The training curves of an SFT, reward-model or DPO run; saved to `path` if given."""
    rows, name = _load(source, required=())
    kind = run_kind(rows)
    if kind not in KINDS:
        raise input_error(
            name or "<history>", "holds no SFT, reward-model or DPO metrics (sft/, reward/, dpo/)"
        )
    title, xlabel, panels = KINDS[kind]
    panels = [p for p in panels if any(_series(rows, m)[0].size for m, _ in p[2])]
    nrows, ncols = _grid(len(panels))
    with _style():
        fig = Figure(figsize=(4.6 * ncols + 0.6, 3.4 * nrows + 0.9), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
        for ax, (panel, ylabel, metrics) in zip(axes, panels):
            handles = []
            for i, (metric, label) in enumerate(metrics):
                x, y = _series(rows, metric)
                if not y.size:
                    continue
                if "eval_" in metric:
                    (line,) = ax.plot(x, y, "o--", color=HELD_OUT, lw=1.4, ms=5, label=label)
                else:
                    color = TRAIN if i == 0 else OTHER
                    line = _draw(ax, x, y, color, label, smooth)
                handles.append(line)
            ax.set_title(panel, loc="left")
            ax.set_ylabel(ylabel)
            if len(handles) > 1:
                ax.legend(handles, [h.get_label() for h in handles], loc="best")
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[max(0, len(panels) - ncols) : len(panels)]:
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
        fig.suptitle(f"{name + ': ' if name else ''}{title} training", fontsize=13,
                     fontweight="bold")  # fmt: skip
        fig.supxlabel("thin: per-step values; thick: EMA; points: held-out evaluations",
                      fontsize=8.5, color="0.35")  # fmt: skip
    _save(fig, path)
    return fig
