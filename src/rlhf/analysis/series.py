"""What the figures in `plots` are drawn from: the logged metrics, and how each series is drawn.

- `load_history`: the metric rows of a run folder, a `metrics.jsonl` path or a list of dicts.
- `ema` and `_draw`: each series drawn raw and smoothed; `_style`, `_grid`, `_save`: the figures'
  shared look, panel layout and atomic saving.

Smoothing. Every series is drawn twice: the logged per-step values as a thin translucent line, and
an exponential moving average on top, debiased like TensorBoard's smoothing slider:
`s_t = w * s_{t-1} + (1 - w) * x_t`, shown as `s_t / (1 - w^t)` so the first steps are not pulled
towards zero. `smooth="auto"` picks `w = n / (n + 20)` for a series of n points, a time constant of
about 5% of the run (w = 0.71 for 50 steps, 0.98 for 1000); a float in [0, 1) sets w; 0 or None
draws the raw values only. Null (non-finite) values are skipped, in both lines.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..data import atomic_write, read_jsonl
from ..errors import input_error

History = Sequence[Mapping[str, Any]]
Source = str | Path | History

REQUIRED = ("objective/reward", "objective/kl")
DPI = 140
WINDOW = 5
"""steps in the trailing means that decide a peak or a final value, in figures and reports alike"""


# ---------------------------------------------------------------- reading


def load_history(source: Source, required: Sequence[str] = REQUIRED) -> list[dict[str, Any]]:
    """Metrics rows from a run folder, a `metrics.jsonl` path, or a list of dicts.

    Every row needs a numeric "step" and the `required` keys (their values may be null). Rows come
    back sorted by step; a step logged twice is one row, the later value of each key winning (a
    resumed run logs its steps again; DPO and SFT log a step's held-out numbers in a row of their own).
    """
    return _load(source, required)[0]


def _load(source: Source, required: Sequence[str] = REQUIRED) -> tuple[list[dict[str, Any]], str]:
    """(rows, the name to show in titles and errors)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if not (path / "metrics.jsonl").is_file():
                raise input_error(
                    path, "has no metrics.jsonl; give the output folder of `rlhf ppo`"
                )
            path = path / "metrics.jsonl"
        rows, where = read_jsonl(path), path
        name = path.resolve().parent.name if path.name == "metrics.jsonl" else path.stem
    elif isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        rows, where, name = [dict(r) for r in source], "<history>", ""
        if not rows:
            raise input_error(where, "has no records")
    else:
        raise TypeError(
            f"expected a run folder, a metrics.jsonl path or a list of dicts, got {type(source)}"
        )
    by_step: dict[float, dict[str, Any]] = {}
    for i, row in enumerate(rows, 1):
        for key in ("step", *required):
            if key not in row:
                raise input_error(
                    where, f"missing in record {i} (is this a PPO metrics log?)", field=key
                )
        step = row["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            raise input_error(where, f"record {i}: expected a number, got {step!r}", field="step")
        by_step[step] = {**by_step.get(step, {}), **row}
    return [by_step[s] for s in sorted(by_step)], name


def _series(rows: History, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` where it is a finite number; missing and null values are skipped."""
    pairs = [
        (r["step"], float(v))
        for r in rows
        if isinstance(v := r.get(key), (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def trailing_means(values: Sequence[float], k: int = WINDOW) -> list[float]:
    """Mean of each value and the k - 1 before it (fewer at the start)."""
    return [
        sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
        for i in range(len(values))
    ]


def _has(rows: History, key: str) -> bool:
    return _series(rows, key)[0].size > 0


# ---------------------------------------------------------------- drawing helpers


def ema(values: Sequence[float], smooth: float | str | None = "auto") -> np.ndarray:
    """Debiased exponential moving average of `values` (see the module docstring for `smooth`)."""
    x = np.asarray(values, dtype=float)
    w = _weight(smooth, len(x))
    out, s = np.empty_like(x), 0.0
    for t, v in enumerate(x, 1):
        s = w * s + (1 - w) * v
        out[t - 1] = s / (1 - w**t)
    return out


def _weight(smooth: float | str | None, n: int) -> float:
    if smooth is None:
        return 0.0
    if smooth == "auto":
        return n / (n + 20)
    if isinstance(smooth, str) or not 0 <= smooth < 1:
        raise ValueError(f"smooth must be 'auto', None or a number in [0, 1), got {smooth!r}")
    return float(smooth)


def _draw(ax: Axes, x, y, color: str, label: str, smooth, style: str = "-") -> Line2D:
    """Raw values thin and translucent, EMA on top; returns the line for the legend."""
    if _weight(smooth, len(y)) == 0:
        (raw,) = ax.plot(x, y, style, color=color, lw=1.6, label=f"{label} (raw)")
        return raw
    ax.plot(x, y, style, color=color, lw=0.8, alpha=0.35, label=f"{label} (raw)")
    (line,) = ax.plot(x, ema(y, smooth), style, color=color, lw=2.0, label=label)
    return line


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.framealpha": 0.85,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "grid.linewidth": 0.6,
        }
    ):
        yield


def _grid(n: int) -> tuple[int, int]:
    return (1, n) if n <= 3 else (2, 2) if n == 4 else (math.ceil(n / 3), 3)


def _save(fig: Figure, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI)
