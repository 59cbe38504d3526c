"""Live reward-hacking detection during PPO: `HackingDetector` watches each step's metrics.

`train_ppo` (in `run`) feeds it every step and prints its one warning; its state is saved in
checkpoints. The after-the-fact experiments (KL sweeps, gold vs proxy) are in `rlhf.analysis`.
"""

from __future__ import annotations

import copy

SIGNALS = ("gold", "distinct_2", "disagreement")
TRACKED = (
    "objective/reward", "reward/unshaped", "objective/gold", "text/distinct_2",
    "reward/ensemble_std",
)  # fmt: skip


class HackingDetector:
    """Warns once, live, when the proxy reward keeps rising while something says it is hacked.

    Tracks exponential moving averages (weight `smooth`) of the proxy reward (`reward/unshaped`,
    the reward model's score before --reward-shaping, when logged; else `objective/reward`), the
    gold score (when there is one), distinct-2 and, with an ensemble reward model, the members'
    disagreement (`reward/ensemble_std`). After `warmup`, at a step where the proxy's average is
    at its running maximum (still rising), a signal fires when:

    gold          the gold average has fallen `gold_drop` below its peak;
    distinct_2    without a gold judge, distinct-2 has fallen to `diversity_drop` times its peak;
    disagreement  the disagreement average has risen to `disagreement_rise` times its baseline,
                  its average at the end of warmup: the policy is leaving the reward model's data.

    `fired` records the first step of each signal (the disagreement's even with a gold judge, so
    that its lead on the gold score can be measured); the warning is that of the first to fire.
    """

    def __init__(
        self,
        smooth: float = 0.8,
        warmup: int = 10,
        gold_drop: float = 0.1,
        diversity_drop: float = 0.5,
        disagreement_rise: float = 2.0,
    ):
        # diversity_drop 0.5: replayed without its gold scores, the demo's healthy kl_coef=0.1 run
        # (distinct-2 0.66 -> 0.41 over 70 steps) tripped 0.75 at step 47 but never 0.5, while the
        # kl_coef=0 run crosses 0.5 at step 25, the step the gold score gives.
        self.smooth, self.warmup = smooth, warmup
        self.gold_drop, self.diversity_drop = gold_drop, diversity_drop
        self.disagreement_rise = disagreement_rise
        self.avg: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        # The disagreement's baseline is frozen at the end of warmup, not its minimum so far: the
        # minimum of a noisy average is biased low (ratios against it trip on noise), and a policy
        # that first moves where the members agree (confidently positive text) would lower it, so
        # a later return to the starting level would look like a rise. The reference policy's own
        # samples are the reward model's data; twice their disagreement is leaving it.
        self.baseline: float | None = None
        self.fired: dict[str, int] = {}
        self.step: int | None = None
        self.message: str | None = None

    def state_dict(self) -> dict:
        """What a checkpoint keeps (plain values)."""
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. A state saved before the disagreement signal existed loads
        too: its one warning, if any, gives `fired`, and past warmup the disagreement's baseline
        is taken at the step the run resumes from."""
        vars(self).update(copy.deepcopy(state))
        if "fired" not in state and self.step is not None:
            signal = "gold" if "gold score fell" in (self.message or "") else "distinct_2"
            self.fired = {signal: self.step}

    @property
    def proxy(self) -> str:
        """The metric watched as the proxy: the reward model's score before any shaping."""
        return "reward/unshaped" if "reward/unshaped" in self.avg else "objective/reward"

    def update(self, step: int, metrics: dict) -> str | None:
        """Feed one step's metrics; returns the warning the first time hacking is detected."""
        for key in TRACKED:
            if metrics.get(key) is None:
                continue
            prev = self.avg.get(key, metrics[key])
            self.avg[key] = self.smooth * prev + (1 - self.smooth) * metrics[key]
            self.peak[key] = max(self.peak.get(key, self.avg[key]), self.avg[key])
        if step < self.warmup:
            return None
        if self.baseline is None and "reward/ensemble_std" in self.avg:
            self.baseline = self.avg["reward/ensemble_std"]
        reward = self.avg[self.proxy]
        if reward < self.peak[self.proxy] - 1e-9:
            return None
        reasons = {}
        if "objective/gold" in self.avg:
            gold, peak = self.avg["objective/gold"], self.peak["objective/gold"]
            if gold < peak - self.gold_drop:
                reasons["gold"] = f"the gold score fell from {peak:.2f} to {gold:.2f}"
        # With a gold judge its score is the verdict; text diversity is the signal only without
        # one (a well-behaved policy's positive reviews are also less varied than the base model's).
        elif "text/distinct_2" in self.avg:
            distinct, peak = self.avg["text/distinct_2"], self.peak["text/distinct_2"]
            if distinct < self.diversity_drop * peak:
                reasons["distinct_2"] = f"distinct-2 fell from {peak:.2f} to {distinct:.2f}"
        # Needs no judge: the members disagree where their training data says little.
        if self.baseline is not None and self.baseline > 0:
            now = self.avg["reward/ensemble_std"]
            if now >= self.disagreement_rise * self.baseline:
                reasons["disagreement"] = (
                    f"the reward ensemble's disagreement rose from {self.baseline:.3f} to "
                    f"{now:.3f} (its members no longer agree on the policy's samples)"
                )
        new = {k: v for k, v in reasons.items() if k not in self.fired}
        for signal in new:
            self.fired[signal] = step
        if not new or self.step is not None:
            return None
        self.step = step
        self.message = (
            f"reward hacking at step {step}: the proxy reward is still rising ({reward:.2f}) but "
            + " and ".join(new.values())
            + "; the policy is exploiting the proxy reward (raise --kl-coef or stop here)"
        )
        return self.message
