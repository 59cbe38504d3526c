"""`rlhf demo`: every stage of the built-in task in order, reusing what is cached, and a report.

base model -> preferences -> reward model -> PPO with and without the KL penalty (plus a run with a
large penalty and a vanilla policy-gradient run, for the seed's questions 2 and 4) -> figures ->
report.md and summary.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from .analysis.hacking import RUN_COLORS, demonstrate_reward_hacking, summarise_run
from .analysis.plots import plot_run_dir, plot_runs
from .data import atomic_write_json, read_jsonl
from .reward.train import RewardConfig
from .rl.config import PPORunConfig
from .rl.inputs import default_reward_model_dir
from .rl.run import train_ppo
from .task.default import BaseModelConfig, base_model_dir, base_model_info
from .trackers import parse_report_to
from .tracking import save_options


@dataclass
class DemoConfig:
    """Sizes of one demo: the full one, or the smoke-sized `--quick` one."""

    base: BaseModelConfig
    reward: RewardConfig
    ppo: PPORunConfig
    steps: int
    side_steps: int  # steps of the large-KL and vanilla-PG runs
    large_kl_coef: float = 1.0


def demo_config(quick: bool, seed: int, device: str) -> DemoConfig:
    if quick:
        # Smoke size: a 2 x 64 model, 3,000 pairs, a few PPO steps. About 35 s on 2 cores.
        base = BaseModelConfig(
            n_reviews=8000, steps=300, n_layer=2, n_embd=64, n_head=2, batch_size=32, seed=seed
        )
        reward = RewardConfig(
            n_pairs=3000, epochs=2, normalise_samples=128, seed=seed, device=device
        )
        ppo = PPORunConfig(
            lr=1e-4, batch_size=32, minibatch_size=32, sample_every=2, seed=seed, device=device
        )
        return DemoConfig(base, reward, ppo, steps=16, side_steps=6)
    base = BaseModelConfig(seed=seed)
    reward = RewardConfig(seed=seed, device=device)
    ppo = PPORunConfig(lr=1e-4, seed=seed, device=device)
    # 70 steps: the no-KL run's gold score peaks near step 20 and has collapsed by 50; the whole
    # demo takes about 4.5 minutes on 2 cores from a cold cache (README).
    return DemoConfig(base, reward, ppo, steps=70, side_steps=35)


def run_demo(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    cache_dir=None,
    device: str = "auto",
    progress: bool = True,
    report_to: str = "tensorboard",
    task: str = "reviews",
) -> dict:
    """Run the whole story and write report.md, summary.json and the figures into `out`
    (default `runs/demo`, or `runs/demo-quick` with `quick`).

    The runs of an earlier demo in `out` are replaced; its report.md and summary.json are kept,
    renamed with the time they were written, and one printed line says so.
    """
    start = time.perf_counter()
    parse_report_to(report_to)  # a tracker that is not installed stops the demo before it starts
    if task == "arithmetic":
        from .analysis.arithmetic_demo import run_arithmetic_demo

        out_dir = Path(out or ("runs/demo-arithmetic-quick" if quick else "runs/demo-arithmetic"))
        _start_demo(out_dir, quick, seed, cache_dir, device, report_to, task)
        return run_arithmetic_demo(out_dir, quick, seed, cache_dir, device, progress, report_to)
    out_dir = Path(out if out is not None else ("runs/demo-quick" if quick else "runs/demo"))
    demo = demo_config(quick, seed, device)
    timings: dict[str, float] = {}

    _start_demo(out_dir, quick, seed, cache_dir, device, report_to, task)
    t0 = time.perf_counter()
    base_dir = base_model_dir(demo.base, cache_dir=cache_dir, progress=progress)
    info = base_model_info(base_dir)
    timings["base_model_s"] = time.perf_counter() - t0
    print(
        f"base model: {base_dir}\n  held-out perplexity {info['heldout_perplexity']:.2f}; samples:"
    )
    for sample in info["samples"][:3]:
        print(f"    {sample}")

    t0 = time.perf_counter()
    rm_root = default_reward_model_dir(cache_dir, demo.base, demo.reward, progress=progress)
    reward_eval = read_jsonl_one(rm_root / "reward_eval.json")
    timings["reward_model_s"] = time.perf_counter() - t0
    print(
        f"reward model: {rm_root / 'reward_model'}\n  held-out accuracy {reward_eval['accuracy']:.3f} "
        f"(labels agree with the gold ordering {reward_eval['ceiling']:.3f} of the time)"
    )

    base = dataclasses.replace(
        demo.ppo,
        model=str(base_dir),
        reward_model=str(rm_root / "reward_model"),
        cache_dir=cache_dir,
        report_to=report_to,
    )
    t0 = time.perf_counter()
    comparison = demonstrate_reward_hacking(
        out_dir, steps=demo.steps, kl_coef=0.1, seed=seed, base=base, progress=progress
    )
    timings["hacking_runs_s"] = time.perf_counter() - t0

    # Question 2 (kl_coef too large) and question 4 (PPO vs vanilla policy gradient).
    t0 = time.perf_counter()
    side = {
        "large_kl": dataclasses.replace(base, kl_coef=demo.large_kl_coef),
        # One on-policy gradient step per batch and no clipping: REINFORCE with a GAE baseline.
        "vanilla_pg": dataclasses.replace(base, ppo_epochs=1, clip_eps=1e9, value_clip_eps=1e9),
    }
    labels = {"large_kl": "PPO with a large KL penalty", "vanilla_pg": "vanilla policy gradient"}
    for name, cfg in side.items():
        train_ppo(
            dataclasses.replace(cfg, out=str(out_dir / name), steps=demo.side_steps),
            progress=progress,
            label=f"{labels[name]} (kl_coef {cfg.kl_coef:g})",
        )
        plot_run_dir(out_dir / name)
        comparison["runs"][name] = {
            "kl_coef": cfg.kl_coef,
            **summarise_run(read_jsonl(out_dir / name / "metrics.jsonl")),
        }
    # PPO on the same budget as the side runs, read off the with-KL run at the same step.
    with_kl_rows = read_jsonl(out_dir / "with_kl" / "metrics.jsonl")[: demo.side_steps]
    comparison["runs"]["ppo_same_budget"] = {"kl_coef": base.kl_coef, **summarise_run(with_kl_rows)}
    timings["side_runs_s"] = time.perf_counter() - t0

    from .analysis.report import write_report

    coefs = (("no_kl", 0.0), ("with_kl", 0.1), ("large_kl", demo.large_kl_coef))
    plot_runs(
        {f"kl_coef={c:g}": out_dir / n / "metrics.jsonl" for n, c in coefs},
        path=out_dir / "kl_coefs.png",
        title="Three KL coefficients, same seed and reward model",
        colors={f"kl_coef={c:g}": RUN_COLORS[n] for n, c in coefs},
    )
    timings["total_s"] = time.perf_counter() - start
    summary = {
        "quick": quick,
        "seed": seed,
        "base_model": {
            "dir": str(base_dir),
            **{k: info[k] for k in ("heldout_perplexity", "n_parameters", "train_seconds")},
        },
        "reward_model": {
            "dir": str(rm_root / "reward_model"),
            **{k: reward_eval[k] for k in ("accuracy", "ceiling")},
        },
        **{
            name: comparison["runs"][name]
            for name in ("with_kl", "no_kl", "large_kl", "vanilla_pg", "ppo_same_budget")
        },
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out_dir / "summary.json", summary)
    write_report(out_dir, summary, comparison, info, demo)
    print(
        f"done in {timings['total_s']:.0f} s. Open {out_dir / 'report.md'} (figures and tables); numbers in {out_dir / 'summary.json'}"
    )
    return summary


def _start_demo(out_dir: Path, quick, seed, cache_dir, device, report_to, task) -> None:
    """Keep an earlier demo's report (renamed, said in one line) and write config.yaml."""
    kept = keep_earlier_report(out_dir)
    if kept:
        print(
            f"{out_dir} held an earlier demo: its report is kept as {kept[0]}"
            f"{f' (numbers in {kept[1].name})' if len(kept) > 1 else ''}; its runs and figures "
            "are replaced"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_options(
        out_dir, "demo",
        {"out": str(out_dir), "quick": quick, "seed": seed, "cache_dir": cache_dir,
         "device": device, "report_to": report_to, "task": task},
    )  # fmt: skip


def keep_earlier_report(out_dir: Path) -> list[Path]:
    """Rename an earlier demo's report.md and summary.json with the time they were written
    (report-20261126-101500.md), so that a new demo in the same folder does not replace them;
    returns the new paths (none if there was no report)."""
    report = out_dir / "report.md"
    if not report.is_file():
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report.stat().st_mtime))
    suffix, n = stamp, 1
    while (out_dir / f"report-{suffix}.md").exists():
        n += 1
        suffix = f"{stamp}-{n}"
    kept = []
    for name in ("report.md", "summary.json"):
        path = out_dir / name
        if path.is_file():
            stem, ext = name.split(".")
            kept.append(path.rename(out_dir / f"{stem}-{suffix}.{ext}"))
    return kept


def read_jsonl_one(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())
