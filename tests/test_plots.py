"""Tests for rlhf.plots: figures drawn from logged metrics, checked by their plotted data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf.analysis import plots
from rlhf.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BETA = 0.1


def history(
    n: int = 50, beta: float = BETA, gold: bool = True, kl_scale: float = 1.0
) -> list[dict]:
    """Reward rising, KL rising then levelling off, gold rising then falling (reward hacking)."""
    rng = np.random.default_rng(0)
    rows = []
    for t in range(n):
        reward = 2 * (1 - math.exp(-t / 12)) + 0.2 * rng.standard_normal()
        kl = kl_scale * 3 * (1 - math.exp(-t / 10)) + 0.1 * rng.random()
        row = {
            "step": t,
            "objective/reward": reward,
            "objective/kl": kl,
            "objective/combined": reward - beta * kl,
            "objective/kl_coef": beta,
            "policy/approxkl": 0.01 + 0.002 * rng.random(),
            "policy/clipfrac": 0.1 + 0.01 * rng.random(),
            "loss/value": math.exp(-t / 20),
            "text/distinct_2": 0.8 - 0.004 * t,
        }
        if gold:
            row["objective/gold"] = 0.6 * math.sin(math.pi * t / n)
        rows.append(row)
    return rows


def lines(fig) -> dict:
    """Every labelled line in the figure, by label."""
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}


def raw(fig, key: str):
    return lines(fig)[plots.METRICS[key][0] + " (raw)"]


def column(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # three panels of lines, not an empty canvas


def write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_tradeoff_writes_png_and_plots_the_logged_values(tmp_path):
    rows = history()
    fig = plots.plot_reward_kl_tradeoff(rows, tmp_path / "tradeoff.png")
    assert_png(tmp_path / "tradeoff.png")
    steps = [r["step"] for r in rows]
    for key in ("objective/reward", "objective/gold", "objective/kl"):
        line = raw(fig, key)
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), column(rows, key))
    combined = raw(fig, "objective/combined").get_ydata()
    expected = [r["objective/reward"] - BETA * r["objective/kl"] for r in rows]
    np.testing.assert_allclose(combined, expected, rtol=1e-12)
    assert "β = 0.1" in fig.get_suptitle()
    # the smoothed lines sit on top, one per series, and are what the legends show
    for key in ("objective/reward", "objective/gold", "objective/kl", "objective/combined"):
        assert plots.METRICS[key][0] in lines(fig)
    assert all(ax.get_legend() is not None for ax in fig.axes[:3])
    assert fig.axes[2].get_xlabel() == "step"


def test_combined_from_kl_coef_when_not_logged(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "objective/combined"} for r in history()]
    fig = plots.plot_reward_kl_tradeoff(rows)
    expected = [r["objective/reward"] - BETA * r["objective/kl"] for r in rows]
    np.testing.assert_allclose(raw(fig, "objective/combined").get_ydata(), expected)
    # an explicit kl_coef recomputes the objective with that constant
    fig = plots.plot_reward_kl_tradeoff(history(), kl_coef=0.5)
    expected = [r["objective/reward"] - 0.5 * r["objective/kl"] for r in rows]
    np.testing.assert_allclose(raw(fig, "objective/combined").get_ydata(), expected)
    assert "β = 0.5" in fig.get_suptitle()
    bare = [{k: r[k] for k in ("step", "objective/reward", "objective/kl")} for r in rows]
    with pytest.raises(InputError, match="kl_coef"):
        plots.plot_reward_kl_tradeoff(bare)


def test_tradeoff_from_jsonl_path_and_run_dir(tmp_path):
    rows = history(gold=False)
    run = write_run(tmp_path / "run", rows)
    for source in (run / "metrics.jsonl", run, str(run)):
        fig = plots.plot_reward_kl_tradeoff(source)
        np.testing.assert_allclose(
            raw(fig, "objective/kl").get_ydata(), column(rows, "objective/kl")
        )
        assert fig.get_suptitle().startswith("run:")
        assert plots.METRICS["objective/gold"][0] + " (raw)" not in lines(fig)


def test_null_values_are_skipped(tmp_path):
    rows = history()
    rows[3]["objective/kl"] = None
    rows[7]["objective/reward"] = None
    rows[7]["objective/combined"] = None
    rows[9]["objective/gold"] = None
    fig = plots.plot_reward_kl_tradeoff(rows, tmp_path / "nulls.png")
    assert_png(tmp_path / "nulls.png")
    kl = raw(fig, "objective/kl")
    assert 3 not in kl.get_xdata() and len(kl.get_xdata()) == len(rows) - 1
    np.testing.assert_allclose(kl.get_ydata(), column(rows, "objective/kl"))
    assert len(raw(fig, "objective/reward").get_ydata()) == len(rows) - 1
    assert np.isfinite(lines(fig)[plots.METRICS["objective/kl"][0]].get_ydata()).all()


def test_missing_required_key_names_the_key_and_file(tmp_path):
    rows = history()
    del rows[4]["objective/kl"]
    run = write_run(tmp_path / "run", rows)
    with pytest.raises(InputError, match="objective/kl") as info:
        plots.plot_reward_kl_tradeoff(run)
    assert "metrics.jsonl" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="'step'"):
        plots.load_history([{"objective/reward": 1.0, "objective/kl": 0.0}])
    with pytest.raises(InputError, match="metrics.jsonl"):
        plots.load_history(tmp_path)  # a folder with no metrics.jsonl


def test_load_history_sorts_and_keeps_the_last_row_of_a_repeated_step():
    rows = history(5)
    resumed = [*rows, {**rows[2], "objective/reward": 9.0}]
    loaded = plots.load_history(resumed[::-1])
    assert [r["step"] for r in loaded] == [0, 1, 2, 3, 4]
    assert loaded[2]["objective/reward"] == rows[2]["objective/reward"]  # reversed: original last


def test_adaptive_beta_and_no_smoothing():
    rows = history(20)
    for i, r in enumerate(rows):
        r["objective/kl_coef"] = 0.2 / (1 + i)
    fig = plots.plot_reward_kl_tradeoff(rows, smooth=None)
    assert "adaptive β" in fig.get_suptitle()
    assert plots.METRICS["objective/reward"][0] not in lines(fig)  # raw lines only
    assert "penalty β·KL (raw)" in lines(fig)


def test_ema():
    np.testing.assert_allclose(plots.ema([2.0] * 10, 0.9), [2.0] * 10)  # debiased: no ramp from 0
    np.testing.assert_allclose(plots.ema([1.0, 3.0], 0.0), [1.0, 3.0])
    np.testing.assert_allclose(plots.ema([1.0, 3.0], 0.5), [1.0, (0.25 + 1.5) / 0.75])
    with pytest.raises(ValueError):
        plots.ema([1.0], 1.0)


def test_plot_runs_two_runs(tmp_path):
    free = history(kl_scale=100.0)  # no KL penalty: KL grows 100x larger
    free[5]["objective/gold"] = None
    run = write_run(tmp_path / "penalised", history())
    metrics = (
        "objective/reward",
        "objective/gold",
        "objective/kl",
        "text/distinct_2",
        "text/repetition",
    )
    fig = plots.plot_runs(
        {"kl_coef=0.1": run, "kl_coef=0": free}, tmp_path / "runs.png", metrics=metrics
    )
    assert_png(tmp_path / "runs.png")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4  # text/repetition was logged by neither run
    for ax in visible:
        assert {ln.get_label() for ln in ax.get_lines()} >= {"kl_coef=0.1", "kl_coef=0"}
    kl_ax = next(
        ax for ax in visible if ax.get_title(loc="left") == plots.METRICS["objective/kl"][0]
    )
    assert kl_ax.get_yscale() == "symlog" and "symlog" in kl_ax.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["kl_coef=0.1", "kl_coef=0"]
    # similar KL scales stay linear
    fig = plots.plot_runs({"a": history(), "b": history(kl_scale=2.0)}, metrics=["objective/kl"])
    assert fig.axes[0].get_yscale() == "linear"


def test_plot_run_dir_writes_both_figures(tmp_path):
    run = write_run(tmp_path / "run", history())
    written = plots.plot_run_dir(run)
    assert written == [run / "reward_kl_tradeoff.png", run / "training_diagnostics.png"]
    for path in written:
        assert_png(path)
    assert not list(run.glob(".*tmp*"))  # atomic writes leave no temporary files
    with pytest.raises(InputError):
        plots.plot_run_dir(tmp_path / "missing")


def test_training_curves_of_dpo_sft_and_reward_runs(tmp_path):
    from rlhf.analysis.curves import plot_training_curves, run_kind

    dpo = [{"step": 0, "dpo/eval_accuracy": 0.0, "dpo/eval_loss": math.log(2)}]
    dpo += [
        {"step": s, "dpo/loss": 0.69 - 0.02 * s, "dpo/accuracy": 0.5 + 0.01 * s,
         "dpo/margin": 0.1 * s, "dpo/chosen_reward": 0.05 * s, "dpo/rejected_reward": -0.05 * s}
        for s in range(1, 21)
    ]  # fmt: skip
    dpo.append({"step": 20, "dpo/eval_accuracy": 0.8, "dpo/eval_loss": 0.4})  # the same step
    run = write_run(tmp_path / "dpo", dpo)
    assert run_kind(plots.load_history(run, required=())) == "dpo"
    assert plots.plot_run_dir(run) == [run / "training_curves.png"]
    assert_png(run / "training_curves.png")
    fig = plot_training_curves(run)
    held_out = [ln for ln in fig.axes[1].get_lines() if ln.get_label() == "held-out"]
    assert [list(held_out[0].get_xdata()), list(held_out[0].get_ydata())] == [[0, 20], [0.0, 0.8]]
    raw_loss = next(
        ln for ln in fig.axes[0].get_lines() if ln.get_label() == "training batch (raw)"
    )
    assert list(raw_loss.get_ydata()) == column(dpo, "dpo/loss")
    # The row logged twice at step 20 keeps both its training and its held-out values.
    assert plots.load_history(run, required=())[-1]["dpo/loss"] == dpo[-2]["dpo/loss"]
    sft = write_run(tmp_path / "sft", [{"step": s, "sft/loss": 3.0 / (s + 1)} for s in range(5)])
    fig = plot_training_curves(sft)
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible()] == ["Loss"]
    with pytest.raises(InputError, match="holds no SFT, reward-model or DPO metrics"):
        plot_training_curves(history(5))
