"""`rlhf sweep`: every method on one over-optimisation frontier, with a band over seeds.

For each RL method (an advantage estimator on the PPO loop) and KL coefficient, one run per seed;
for DPO one run per beta and seed; best-of-n per seed. Every run's gold and proxy scores are
read against d = sqrt(KL to the reference), relative to the reference policy, and the functional
forms of Gao, Schulman and Hilton (2022) are fitted to each method's gold points with their R^2:
R(d) = d (a - b log d) for RL (and DPO), R(d) = d (a - b d) for best-of-n.

Budgets are equal: every RL step samples the same number of sequences (--sequences; the group
methods as --sequences / k prompts x k samples), with the same learning rate and response length.
A finished run (its summary.json or dpo_eval.json is there, and its config.json holds the options
this sweep would give it) is read back instead of run again, so an interrupted sweep resumes where
it stopped; a run made with other options is made again. Every method's gold and KL are measured
on prompts from the task's training openings (PPO's rollouts; DPO with --eval-split train).

With --defences every RL run is also made with each defence (`defences`: the built-in ensemble
reward model combined by mean, min or uwo, or PAR shaping), each its own method in the table and
the figure (`gae-min`), with the disagreement alarm's lead on the gold peak where it has an
ensemble. The defence none is the sweep as without the option, its runs under the same names.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from ..data import atomic_write_json, read_jsonl
from ..rl.checkpoint import option_flag
from ..rl.config import GROUP_ESTIMATORS, PPORunConfig
from ..rl.run import train_ppo
from ..tracking import option_changes
from .defences import alarm_cells, alarm_summary, defence_options, entry_name, run_alarm
from .frontier_plot import entry_label, plot_methods
from .series import trailing_means
from .sweep import best_of_n_curve, fit_functional_form
from .sweep_config import ENSEMBLE_DEFENCES, RL_METHODS, SweepPlan


def run_name(method: str, coef: float, seed: int, defence: str = "none") -> str:
    """The run's folder in the sweep: `gae/kl_0.1/seed_0`, with a defence `gae-min/kl_0.1/seed_0`."""
    knob = "beta" if method == "dpo" else "kl"
    return f"{entry_name(method, defence)}/{knob}_{coef:g}/seed_{seed}"


def _rl_run(
    base: PPORunConfig,
    plan: SweepPlan,
    method: str,
    coef: float,
    seed: int,
    out: Path,
    progress: bool,
    defence: str = "none",
    ensemble_dir: str | None = None,
) -> dict:
    """One RL run (or its saved result) as per-step curves of d, gold, proxy and seconds, and
    its alarm (`defences.run_alarm`)."""
    run_dir = out / run_name(method, coef, seed, defence)
    k = plan.samples_per_prompt if method in GROUP_ESTIMATORS else 1
    cfg = dataclasses.replace(
        base, out=str(run_dir), advantage_estimator=method, kl_coef=coef, seed=seed,
        steps=plan.steps, samples_per_prompt=k, batch_size=plan.sequences // k,
        minibatch_size=plan.sequences, adaptive_kl=False, kl_in="auto", kl_estimator="auto",
        loss_aggregation="auto", value_model="shared",
        **defence_options(defence, plan, ensemble_dir),
    )  # fmt: skip
    resolved = dataclasses.replace(cfg)
    resolved.resolve()  # config.json holds what "auto" stood for
    done = (run_dir / "summary.json").is_file() and _same_options(run_dir, resolved)
    if not (done and len(read_jsonl(run_dir / "metrics.jsonl")) == plan.steps):
        label = entry_label(method, {"defence": defence})
        train_ppo(cfg, progress=progress, label=f"{label}, kl_coef {coef:g}, seed {seed}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    seconds, total = [], 0.0
    for r in rows:
        total += r.get("time/step_s") or 0.0
        seconds.append(total)
    kl = trailing_means([max(r["objective/kl"], 0.0) for r in rows])
    gold = trailing_means([r["objective/gold"] for r in rows])
    # The proxy is the reward model's score, before shaping (PAR's is in (0, 1)).
    proxy = [r.get("reward/unshaped", r["objective/reward"]) for r in rows]
    return {
        "d": [math.sqrt(x) for x in kl],
        "gold": gold,
        "proxy": trailing_means(proxy),
        "seconds": seconds,
        "step_s": sum(r.get("time/step_s") or 0.0 for r in rows[1:]) / max(1, len(rows) - 1),
        "alarm": run_alarm(rows, gold),
    }


def _dpo_run(
    base: PPORunConfig, prefs: Path, beta: float, seed: int, out: Path, progress: bool
) -> dict:
    """One DPO run (or its saved result) as a single point: gold and d on fresh samples."""
    from ..rl.dpo import DPOConfig, train_dpo

    run_dir = out / run_name("dpo", beta, seed)
    result_file = run_dir / "dpo_eval.json"
    # Gold and KL on prompts from the training openings, as PPO's rollouts are scored.
    cfg = DPOConfig(
        out=str(run_dir), data=str(prefs), model=base.model, beta=beta, seed=seed, gold=True,
        eval_split="train", eval_response_tokens=base.response_tokens, cache_dir=base.cache_dir,
        device=base.device, report_to=base.report_to,
    )  # fmt: skip
    if not (result_file.is_file() and _same_options(run_dir, cfg)):
        train_dpo(cfg, progress=progress)
    import json

    result = json.loads(result_file.read_text())
    return {
        "d": [0.0, math.sqrt(max(result["policy"]["kl"], 0.0))],
        "gold": [result["reference"]["gold"], result["policy"]["gold"]],
        "seconds": [0.0, result["seconds"]],
    }


def _same_options(run_dir: Path, cfg) -> bool:
    """Whether the finished run in `run_dir` was made with `cfg`'s options; if not, say which
    differ (the run is then made again, replacing it)."""
    import json

    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    changes = [
        f"{option_flag(name)} {old} -> {now}"
        for name, old, now in option_changes(saved, cfg)
        if name not in ("out", "device")  # where the run sits or runs does not change it
    ]
    if changes:
        print(f"{run_dir}: made with other options ({', '.join(changes)}); running it again")
    return not changes


def _mean_curve(curves: list[dict], key: str) -> list[float]:
    n = min(len(c[key]) for c in curves)
    return [sum(c[key][i] for c in curves) / len(curves) for i in range(n)]


def _std_curve(curves: list[dict], key: str) -> list[float]:
    n = min(len(c[key]) for c in curves)
    out = []
    for i in range(n):
        xs = [c[key][i] for c in curves]
        m = sum(xs) / len(xs)
        out.append(math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)))
    return out


def r_squared(d: list[float], r: list[float], form: str, a: float, b: float) -> float:
    """Share of the variance of r that the fitted R(d) explains."""
    fitted = [x * (a - b * (math.log(x) if form == "rl" else x)) if x > 0 else 0.0 for x in d]
    mean = sum(r) / len(r)
    total = sum((y - mean) ** 2 for y in r)
    residual = sum((y - f) ** 2 for y, f in zip(r, fitted))
    return 1.0 - residual / total if total > 0 else float("nan")


def frontier_sweep(
    plan: SweepPlan,
    out: str | Path = "runs/sweep",
    base: PPORunConfig | None = None,
    progress: bool = True,
    ensemble_model: str | Path | None = None,
) -> dict:
    """Run (or read back) every run of the plan; write sweep.json and sweep.png; return the result.

    `ensemble_model` is the ensemble reward model folder of the defences mean, min and uwo;
    default: the built-in task's, of `base.ensemble_members` (trained on first use)."""
    from ..rl.inputs import builtin_reward_config, default_reward_model_dir
    from ..task.default import base_model_dir

    out = Path(out)
    base = base or PPORunConfig()
    if base.model is None:
        base = dataclasses.replace(
            base, model=str(base_model_dir(cache_dir=base.cache_dir, progress=progress))
        )
    rm_root = None
    if base.reward_model is None:
        rm_root = default_reward_model_dir(base.cache_dir, progress=progress)
        base = dataclasses.replace(base, reward_model=str(rm_root / "reward_model"))
    if any(d in ENSEMBLE_DEFENCES for d in plan.defences) and ensemble_model is None:
        members = builtin_reward_config(dataclasses.replace(base, reward_ensemble="mean"))
        ensemble_model = (
            default_reward_model_dir(base.cache_dir, reward_cfg=members, progress=progress)
            / "reward_model"
        )
    ensemble_dir = str(ensemble_model) if ensemble_model is not None else None
    seeds = list(range(base.seed, base.seed + plan.seeds))
    methods: dict[str, dict] = {}
    for method in plan.methods:
        if method in RL_METHODS:
            for defence in plan.defences:
                settings = {}
                for coef in plan.kl_coefs:
                    curves = [
                        _rl_run(base, plan, method, coef, s, out, progress, defence, ensemble_dir)
                        for s in seeds
                    ]
                    settings[f"{coef:g}"] = _summarise(curves, coef)
                methods[entry_name(method, defence)] = {
                    "knob": "kl_coef", "settings": settings, "method": method, "defence": defence,
                }  # fmt: skip
        elif method == "dpo":
            prefs = (rm_root or Path(base.reward_model).parent) / "preferences.jsonl"
            if not prefs.is_file():
                from ..errors import ConfigError

                raise ConfigError(
                    f"dpo in the sweep trains on the reward model's preference pairs, but {prefs} "
                    "does not exist; leave --reward-model out to use the built-in task's"
                )
            settings = {}
            for beta in plan.dpo_betas:
                curves = [_dpo_run(base, prefs, beta, s, out, progress) for s in seeds]
                settings[f"{beta:g}"] = _summarise(curves, beta)
            methods[method] = {"knob": "beta", "settings": settings}
        elif method == "best_of_n":
            methods[method] = {"knob": "n", "settings": {"": _best_of_n(base, plan, seeds, out)}}
    result = {"plan": dataclasses.asdict(plan), "seeds": seeds, "methods": methods}
    _fit_and_tabulate(result)
    atomic_write_json(out / "sweep.json", result)
    plot_methods(result, out / "sweep.png")
    return result


def _summarise(curves: list[dict], coef: float) -> dict:
    """Seed-mean curves and the std of gold over seeds, per step."""
    summary = {
        "coef": coef,
        "d": _mean_curve(curves, "d"),
        "gold": _mean_curve(curves, "gold"),
        "gold_std": _std_curve(curves, "gold"),
        "seconds": _mean_curve(curves, "seconds"),
        "per_seed": curves,
    }
    if all("proxy" in c for c in curves):
        summary["proxy"] = _mean_curve(curves, "proxy")
    if all("step_s" in c for c in curves):
        summary["step_s"] = sum(c["step_s"] for c in curves) / len(curves)
    alarm = alarm_summary(curves)
    if alarm is not None:
        summary["alarm"] = alarm
    return summary


def _best_of_n(base: PPORunConfig, plan: SweepPlan, seeds: list[int], out: Path) -> dict:
    import json

    from ..models.loading import load_causal_lm, load_tokenizer
    from ..models.reward_ensemble import load_reward_model
    from ..task import corpus
    from ..task.gold import GoldJudge

    cache = out / "best_of_n.json"
    key = {
        "seeds": seeds, "n_max": plan.bon_n_max, "prompts": plan.bon_prompts,
        "response_tokens": base.response_tokens, "model": base.model,
        "reward_model": base.reward_model,
    }  # fmt: skip
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            return saved["summary"]
    lm, tokenizer = load_causal_lm(base.model), load_tokenizer(base.model)
    rm = load_reward_model(base.reward_model)
    curves = []
    for s in seeds:
        t0 = time.perf_counter()
        points = best_of_n_curve(
            lm, tokenizer, rm, GoldJudge(), corpus.prompts(plan.bon_prompts, seed=s + 7, split="train"),
            plan.bon_n_max, base.response_tokens, s,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        curves.append({
            "d": [p["d"] for p in points], "gold": [p["gold"] for p in points],
            "proxy": [p["proxy"] for p in points], "n": [p["n"] for p in points],
            # Sampling n_max per prompt once serves every n; n costs its share of that.
            "seconds": [elapsed * p["n"] / plan.bon_n_max for p in points],
        })  # fmt: skip
    summary = _summarise(curves, float(plan.bon_n_max))
    summary["n"] = curves[0]["n"]
    atomic_write_json(cache, {**key, "summary": summary})
    return summary


def _fit_and_tabulate(result: dict) -> None:
    """Per method: the fitted functional form with R^2, and the row of the peak table."""
    for name, entry in result["methods"].items():
        form = "bon" if entry.get("method", name) == "best_of_n" else "rl"
        d, gold = [], []
        best = None
        for setting, s in entry["settings"].items():
            gold_0 = s["gold"][0]
            relative = [g - gold_0 for g in s["gold"]]
            d += s["d"]
            gold += relative
            peak = max(range(len(relative)), key=relative.__getitem__)
            row = {
                "setting": setting, "gold": relative[peak], "gold_std": s["gold_std"][peak],
                "kl": s["d"][peak] ** 2, "seconds": s["seconds"][peak], "index": peak,
                "n": s["n"][peak] if "n" in s else None,
                "gold_end": relative[-1], "kl_end": s["d"][-1] ** 2, "alarm": s.get("alarm"),
            }  # fmt: skip
            if best is None or row["gold"] > best["gold"]:
                best = row
        a, b = fit_functional_form(d, gold, form)
        entry["fit"] = {
            "form": "R(d) = d (a - b log d)" if form == "rl" else "R(d) = d (a - b d)",
            "a": a, "b": b, "r2": r_squared(d, gold, form, a, b),
        }  # fmt: skip
        entry["peak"] = best
        steps_s = [s["step_s"] for s in entry["settings"].values() if "step_s" in s]
        if steps_s:
            entry["step_s"] = sum(steps_s) / len(steps_s)


def peak_table(result: dict) -> str:
    """Markdown: per method (and defence), gold at its peak (over settings and steps), the KL
    there, when (the RL step), gold and KL at the end of that setting's runs, the disagreement
    alarm's mean lead on the gold peak and in how many runs it fired (blank without an ensemble),
    the seconds it took to get to the peak; RL methods also their mean seconds per step.
    Seconds are wall time as measured: on a busy machine compare steps, and time a step alone
    (benchmarks/bench_algos.py)."""
    lines = [
        "| method | best setting | gold at its peak (± std over seeds) | KL there (nats) | at step | gold at the end | KL there (nats) | alarm lead (steps) | alarm fired | seconds to get there | s per step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in result["methods"].items():
        method = entry.get("method", name)
        p = entry["peak"]
        knob = entry["knob"]
        setting = f"n = {p['n']}" if method == "best_of_n" else f"{knob} {p['setting']}"
        step_s = f"{entry['step_s']:.2f}" if "step_s" in entry else ""
        at = str(p.get("index", "")) if method in RL_METHODS else ""
        lead, fired = alarm_cells(p.get("alarm"))
        lines.append(
            f"| {entry_label(name, entry)} | {setting} | {p['gold']:+.3f} ± {p['gold_std']:.3f} | "
            f"{p['kl']:.1f} | {at} | {p['gold_end']:+.3f} | {p['kl_end']:.1f} | {lead} | {fired} | "
            f"{p['seconds']:.0f} | {step_s} |"
        )
    return "\n".join(lines)


def alarm_table(result: dict) -> str:
    """Markdown: every setting of every method with an ensemble: the steps of the gold peak and
    of the disagreement alarm per seed ("-": never fired), the mean lead and in how many runs it
    fired. The settings whose gold holds to the end (the penalised runs) show its false alarms.
    Empty when no run had an ensemble."""
    lines = [
        "| method | setting | gold at its peak | gold at the end | gold peak at step | alarm at step | lead (steps) | alarm fired |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in result["methods"].items():
        for setting, s in entry["settings"].items():
            alarm = s.get("alarm")
            if alarm is None:
                continue
            relative = [g - s["gold"][0] for g in s["gold"]]
            peaks = ", ".join(str(x) for x in alarm["gold_peak_steps"])
            steps = ", ".join("-" if x is None else str(x) for x in alarm["alarm_steps"])
            lead, fired = alarm_cells(alarm)
            lines.append(
                f"| {entry_label(name, entry)} | {entry['knob']} {setting} | {max(relative):+.3f} "
                f"| {relative[-1]:+.3f} | {peaks} | {steps} | {lead} | {fired} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""
