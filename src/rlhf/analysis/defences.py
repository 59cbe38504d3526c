"""The defences of `rlhf sweep --defences`, and the disagreement alarm read back from each run.

Each defence is a variation of every RL run of the sweep:

none          the single reward model (the sweep without --defences; its runs keep their names)
mean/min/uwo  the built-in ensemble reward model, its members combined by that rule (Coste et al.
              2023); uwo with the sweep's --uncertainty-coef
shaping       --reward-shaping par (Preference As Reward, Fu et al. 2025), one reference sample

The alarm is the live detector's disagreement signal (`HackingDetector`), replayed on the run's
logged metrics as `train_ppo` fed it, so it fires at the same steps (old runs included). Its lead
is the gold peak's step minus the alarm's: positive when it warns before gold starts to fall.
"""

from __future__ import annotations

from .sweep_config import ENSEMBLE_DEFENCES, SweepPlan

DEFENCE_LABELS = {
    "mean": "ensemble mean",
    "min": "ensemble min",
    "uwo": "ensemble UWO",
    "shaping": "PAR shaping",
}
DEFENCE_COLORS = {"mean": "#17becf", "min": "#e377c2", "uwo": "#bcbd22", "shaping": "#7f7f7f"}


def entry_name(method: str, defence: str) -> str:
    """The method's name in sweep.json and in its run folders: `gae`, `gae-min`, ..."""
    return method if defence == "none" else f"{method}-{defence}"


def defence_options(defence: str, plan: SweepPlan, ensemble_dir: str | None) -> dict:
    """The `PPORunConfig` fields that `defence` sets on an RL run."""
    if defence in ENSEMBLE_DEFENCES:
        coef = plan.uncertainty_coef if defence == "uwo" else 0.0
        return {"reward_model": ensemble_dir, "reward_ensemble": defence, "uncertainty_coef": coef}
    if defence == "shaping":
        return {"reward_shaping": "par", "par_samples": 1}
    return {}


def replay_detector(rows: list[dict]) -> dict[str, int]:
    """The first step of each signal of the live detector, on a run's metrics.jsonl rows."""
    from ..rl.detector import HackingDetector

    detector = HackingDetector()
    for row in rows:
        detector.update(row["step"], row)
    return dict(detector.fired)


def run_alarm(rows: list[dict], gold: list[float]) -> dict:
    """One run's alarm: whether it had an ensemble, the step the disagreement alarm fired (None:
    never), the step of its gold peak (on the smoothed `gold` curve) and the lead between them."""
    fired = replay_detector(rows)
    peak = rows[max(range(len(gold)), key=gold.__getitem__)]["step"]
    alarm = fired.get("disagreement")
    return {
        "ensemble": any(r.get("reward/ensemble_std") is not None for r in rows),
        "alarm_step": alarm,
        "gold_peak_step": peak,
        "lead": None if alarm is None else peak - alarm,
        "signals": fired,
    }


def alarm_summary(curves: list[dict]) -> dict | None:
    """Over seeds: how many runs the alarm fired in, and its mean lead over those (None without
    an ensemble)."""
    alarms = [c["alarm"] for c in curves if "alarm" in c]
    if not alarms or not all(a["ensemble"] for a in alarms):
        return None
    leads = [a["lead"] for a in alarms if a["lead"] is not None]
    return {
        "fired": len(leads),
        "runs": len(alarms),
        "lead": sum(leads) / len(leads) if leads else None,
        "alarm_steps": [a["alarm_step"] for a in alarms],
        "gold_peak_steps": [a["gold_peak_step"] for a in alarms],
    }


def alarm_cells(alarm: dict | None) -> tuple[str, str]:
    """The peak table's two alarm cells: the mean lead in steps, and in how many runs it fired;
    both blank without an ensemble, the lead blank where it never fired."""
    if alarm is None:
        return "", ""
    lead = f"{alarm['lead']:+.0f}" if alarm["lead"] is not None else ""
    return lead, f"{alarm['fired']} of {alarm['runs']}"
