"""report.md for `rlhf demo`: the seed's two tables with measured numbers, samples, and answers to
its four questions written from this run's numbers."""

from __future__ import annotations

from pathlib import Path

from ..data import atomic_write_text, read_jsonl
from .hacking import examples_markdown
from .series import WINDOW


def _at(rows: list[dict], step: int, key: str) -> float | None:
    """Mean of `key` over the WINDOW steps ending at `step` (just the value at step 0)."""
    values = [r[key] for r in rows if step - WINDOW < r["step"] <= step and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def table_steps(n_steps: int) -> list[int]:
    last = n_steps - 1
    return sorted({0, max(1, last // 10), last // 4, last // 2, last})


def quality_label(
    gold: float | None,
    distinct: float,
    peak_gold: float | None,
    initial_gold: float | None,
    initial_distinct: float,
) -> str:
    """Good / degrading / degenerate, from the gold score and distinct-2 (what each threshold means
    is spelled out in the report)."""
    if distinct < 0.5 * initial_distinct or (
        gold is not None and initial_gold is not None and gold < initial_gold - 0.05
    ):
        return "degenerate"
    if (
        gold is not None
        and peak_gold is not None
        and gold < peak_gold - 0.1
        or distinct < 0.8 * initial_distinct
    ):
        return "degrading"
    return "good"


def _sample(run_dir: Path, step: int) -> str:
    """The first sample written at or before `step` (samples are written every few steps), with
    the step it is from when that is an earlier one."""
    rows = [s for s in read_jsonl(run_dir / "samples.jsonl") if s["step"] <= step]
    if not rows:
        return ""
    last_step = max(s["step"] for s in rows)
    pick = next(s for s in rows if s["step"] == last_step)
    when = f"(step {last_step}) " if last_step != step else ""
    return f"{when}{pick['prompt']} **{pick['response']}**".replace("|", "\\|")


def kl_trend(rows: list[dict]) -> str:
    """How the KL ended, from its last two WINDOW-step means: "settled at", "was still rising
    at" or "was falling at" (a change of more than 5% and 0.05 nats between them counts)."""
    kls = [r["objective/kl"] for r in rows if r.get("objective/kl") is not None]
    if len(kls) < 2 * WINDOW:
        return "ended at"
    before, last = sum(kls[-2 * WINDOW : -WINDOW]) / WINDOW, sum(kls[-WINDOW:]) / WINDOW
    if abs(last - before) <= max(0.05 * abs(before), 0.05):
        return "settled at"
    return "was still rising at" if last > before else "was falling at"


def _negative_kl_note(*runs: list[dict]) -> str:
    """A sentence for tables that show a negative KL, which readers take for a bug."""
    if not any((r.get("objective/kl") or 0.0) < 0 for rows in runs for r in rows):
        return ""
    return (
        " A KL below zero is no bug: it is estimated from the sampled tokens (k1, the mean of "
        "log π − log π_ref), which is unbiased but can dip below 0 while the policy is still "
        "close to the reference."
    )


def _compare(a: float, b: float) -> str:
    return "above" if a > b else "below" if a < b else "equal to"


def training_table(rows: list[dict], kl_coef: float) -> str:
    lines = ["| Step | Reward | KL | Combined | Gold |", "|---:|---:|---:|---:|---:|"]
    for step in table_steps(len(rows)):
        reward, kl, gold = (
            _at(rows, step, "objective/reward"),
            _at(rows, step, "objective/kl"),
            _at(rows, step, "objective/gold"),
        )
        gold_cell = "" if gold is None else f"{gold:.2f}"
        lines.append(
            f"| {step} | {reward:.2f} | {kl:.2f} | {reward - kl_coef * kl:.2f} | {gold_cell} |"
        )
    return "\n".join(lines)


def hacking_table(rows: list[dict], run_dir: Path) -> str:
    lines = [
        "| Step | Reward | KL | Output quality | Gold | Distinct-2 | Sample |",
        "|---:|---:|---:|---|---:|---:|---|",
    ]
    golds = [_at(rows, r["step"], "objective/gold") for r in rows]
    peak = max((g for g in golds if g is not None), default=None)
    initial_gold = rows[0].get("objective/gold")
    initial_distinct = rows[0]["text/distinct_2"]
    for step in table_steps(len(rows)):
        gold, distinct = _at(rows, step, "objective/gold"), _at(rows, step, "text/distinct_2")
        peak_so_far = max((g for g in golds[: step + 1] if g is not None), default=peak)
        label = quality_label(gold, distinct, peak_so_far, initial_gold, initial_distinct)
        gold_cell = "" if gold is None else f"{gold:.2f}"
        lines.append(
            f"| {step} | {_at(rows, step, 'objective/reward'):.2f} | {_at(rows, step, 'objective/kl'):.2f} | "
            f"{label} | {gold_cell} | {distinct:.2f} | {_sample(run_dir, step)} |"
        )
    return "\n".join(lines)


def _large_kl_sentence(big: dict, same: dict) -> str:
    """What the large-coefficient run shows, said only as far as its numbers show it."""
    if (
        big["kl"] < 0.5 * same["kl"]
        and big["reward"] - big["initial_reward"] < same["reward"] - same["initial_reward"]
    ):
        return (
            "The penalty outweighs the reward, so the best policy is one that barely moves: "
            "training costs compute and changes little."
        )
    return (
        "Here the larger coefficient did not hold the policy much closer than the smaller one did; "
        "over more steps, or with a larger coefficient, the penalty would dominate."
    )


def write_report(out_dir: Path, summary: dict, comparison: dict, base_info: dict, demo) -> Path:
    w, n, big, pg, same = (
        summary[k] for k in ("with_kl", "no_kl", "large_kl", "vanilla_pg", "ppo_same_budget")
    )
    with_rows = read_jsonl(out_dir / "with_kl" / "metrics.jsonl")
    no_rows = read_jsonl(out_dir / "no_kl" / "metrics.jsonl")
    rm = summary["reward_model"]
    secs = summary["seconds"]
    hack_step = n.get("hacking_step")
    hack_text = (
        f"The live detector flagged hacking at step {hack_step} of the no-KL run"
        if hack_step is not None
        else "The live detector did not flag hacking in this run"
    )
    quick_note = (
        "\n> This is a `--quick` smoke run: tiny models and a handful of steps. The numbers show the "
        "pipeline works, not the effects; run `rlhf demo` for those.\n"
        if summary["quick"]
        else ""
    )
    text = f"""# rlhf demo: RLHF with PPO on the built-in review task
{quick_note}
Everything here was measured by `rlhf demo{" --quick" if summary["quick"] else ""} --seed {summary["seed"]}` in
{secs["total_s"]:.0f} s (base model {secs["base_model_s"]:.0f} s, reward model {secs["reward_model_s"]:.0f} s,
the two main PPO runs {secs["hacking_runs_s"]:.0f} s, the two side runs {secs["side_runs_s"]:.0f} s; cached stages
take about a second).

The task: continue the opening of a short film or product review. A hidden **gold judge** (VADER
sentiment of the review, multiplied by a coherence factor that falls for repetition, out-of-grammar
word pairs, run-on sentences and a missing ending; see `rlhf/task/gold.py`) stands in for the human.
It labelled the preference pairs; the policy never sees it.

## 1. Base model and reward model

- Base (SFT) model: GPT-2 architecture, {base_info["n_parameters"]:,} parameters, held-out perplexity
  {base_info["heldout_perplexity"]:.2f} per token. Samples: {"; ".join(f'"{s}"' for s in base_info["samples"][:3])}.
- Reward model (Bradley-Terry on pairs of base-model samples labelled by the gold judge with human-like
  noise): held-out accuracy **{rm["accuracy"]:.3f}** against the noiseless gold ordering; the noisy
  training labels themselves agree with that ordering {rm["ceiling"]:.3f} of the time. Rewards are
  normalised so that base-model samples score mean 0, std 1.

## 2. PPO with the KL penalty (kl_coef = {w["kl_coef"]:g})

![reward vs KL](with_kl/reward_kl_tradeoff.png)

Each row is the mean over the {WINDOW} steps ending at that step. KL is per response, in nats.{_negative_kl_note(with_rows, no_rows)}

{training_table(with_rows, w["kl_coef"])}

The proxy reward rose from {w["initial_reward"]:.2f} to {w["reward"]:.2f} and the gold score from
{w["initial_gold"]:.2f} to {w["gold"]:.2f}, while the KL {kl_trend(with_rows)} {w["kl"]:.2f} nats.

## 3. Without the KL penalty: reward hacking

![with and without KL](hacking.png)

{hacking_table(no_rows, out_dir / "no_kl")}

"Output quality" is read off the measurements: *good* while the gold score is within 0.1 of its best
so far and distinct-2 (unique word pairs / all word pairs) is at least 80% of the base model's;
*degenerate* once distinct-2 has halved or the gold score is below the base model's; *degrading* in
between. {hack_text}.

| Final ({WINDOW}-step mean) | with KL (kl_coef={w["kl_coef"]:g}) | no KL |
|---|---:|---:|
| proxy reward | {w["reward"]:.2f} | {n["reward"]:.2f} |
| KL (nats) | {w["kl"]:.2f} | {n["kl"]:.2f} |
| gold score | {w["gold"]:.2f} | {n["gold"]:.2f} |
| peak gold score (step) | {w["peak_gold"]:.2f} ({w["peak_gold_step"]}) | {n["peak_gold"]:.2f} ({n["peak_gold_step"]}) |
| distinct-2 | {w["distinct_2"]:.2f} | {n["distinct_2"]:.2f} |
| repetition | {w["repetition"]:.2f} | {n["repetition"]:.2f} |

Responses to the same prompts at the same steps:

{examples_markdown(comparison["examples"], ["with_kl", "no_kl"])}
## 4. Testing your understanding, answered from these runs

**Check 1: why do we need a reference model?** The reward model is only trustworthy on text like the
data it was trained on: samples of the reference (SFT) policy. The KL penalty to that reference keeps
the policy where the reward model's judgement holds. With it, the policy moved {w["kl"]:.1f} nats from
the reference and the gold score went from {w["initial_gold"]:.2f} to {w["gold"]:.2f}. Without it, the
policy moved {n["kl"]:.1f} nats ({n["kl"] / max(w["kl"], 1e-9):.0f}x further) and the gold score ended at
{n["gold"]:.2f} (its peak was {n["peak_gold"]:.2f}), while distinct-2 went from {n["initial_distinct_2"]:.2f}
to {n["distinct_2"]:.2f}. The reference is also what keeps the language fluent: it is the only part of
the objective that rewards sounding like the corpus.

**Check 2: what happens if kl_coef is too large?** With kl_coef = {big["kl_coef"]:g} for
{big["steps"]} steps, the KL stayed at {big["kl"]:.2f} nats and the proxy reward moved only from
{big["initial_reward"]:.2f} to {big["reward"]:.2f} (gold {big["initial_gold"]:.2f} -> {big["gold"]:.2f}),
against {same["reward"]:.2f} (gold {same["gold"]:.2f}) for kl_coef = {same["kl_coef"]:g} after the same
{same["steps"]} steps. {_large_kl_sentence(big, same)} (`kl_coefs.png` shows the three coefficients
together.)

**Check 3: why can't we just maximise the reward directly?** Because the reward model is a proxy:
a finite sample of noisy comparisons of reference-policy text. Maximised without restraint, the policy
finds the reward model's blind spots instead of better reviews: without the penalty the proxy reward
reached {n["reward"]:.2f} ({_compare(n["reward"], w["reward"])} the {w["reward"]:.2f} of the penalised run) while the gold score ended at
{n["gold"]:.2f}, {"below" if n["gold"] < w["gold"] else "not below"} the penalised run's {w["gold"]:.2f}. This is
Goodhart's law; Gao, Schulman and Hilton (2022) measure how the gold reward first rises and then falls
as the policy moves away from the reference.

**Check 4: how does PPO differ from vanilla policy gradient?** Vanilla policy gradient takes one
gradient step per batch of samples, because its gradient is only valid for the policy that produced
them. PPO reuses each batch for several epochs ({demo.ppo.ppo_epochs} here) and keeps that safe by clipping
the probability ratio to [1 - eps, 1 + eps] (eps = {demo.ppo.clip_eps}), so no token's probability
is pushed far in one update. On the same budget ({pg["steps"]} batches, same learning rate and
penalty), PPO reached proxy reward {same["reward"]:.2f} and gold {same["gold"]:.2f}; vanilla policy gradient
(one step per batch, no clipping) reached {pg["reward"]:.2f} and gold {pg["gold"]:.2f}.

## Files

- `with_kl/`, `no_kl/`, `large_kl/`, `vanilla_pg/`: each run's `metrics.jsonl`, `samples.jsonl`,
  `config.json`, TensorBoard logs, final policy and figures (`rlhf plot RUN_DIR` redraws them).
- `hacking.png`, `kl_coefs.png`, `comparison.json`, `examples.md`, `summary.json`.
"""
    path = Path(out_dir) / "report.md"
    atomic_write_text(path, text)
    return path
