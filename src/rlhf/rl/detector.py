"""Live reward-hacking detection during PPO: `HackingDetector` watches each step's metrics.

`train_ppo` (in `run`) feeds it every step and prints its one warning; its state is saved in
checkpoints. The after-the-fact experiments (KL sweeps, gold vs proxy) are in `rlhf.analysis`.
"""

from __future__ import annotations


class HackingDetector:
    """Warns once, live, when the proxy reward keeps rising while true quality falls.

    Tracks exponential moving averages (weight `smooth`) of the proxy reward, the gold score (when
    there is one) and distinct-2. Hacking is declared at the first step, after `warmup`, where the
    proxy's average is at its running maximum (still rising) while the gold average has fallen
    `gold_drop` below its peak or, without a gold judge, distinct-2 has fallen to
    `diversity_drop` times its peak.
    """

    def __init__(
        self,
        smooth: float = 0.8,
        warmup: int = 10,
        gold_drop: float = 0.1,
        diversity_drop: float = 0.5,
    ):
        # diversity_drop 0.5: replayed without its gold scores, the demo's healthy kl_coef=0.1 run
        # (distinct-2 0.66 -> 0.41 over 70 steps) tripped 0.75 at step 47 but never 0.5, while the
        # kl_coef=0 run crosses 0.5 at step 25, the step the gold score gives.
        self.smooth, self.warmup = smooth, warmup
        self.gold_drop, self.diversity_drop = gold_drop, diversity_drop
        self.avg: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.step: int | None = None
        self.message: str | None = None

    def update(self, step: int, metrics: dict) -> str | None:
        """Feed one step's metrics; returns the warning the first time hacking is detected."""
        for key in ("objective/reward", "objective/gold", "text/distinct_2"):
            if metrics.get(key) is None:
                continue
            prev = self.avg.get(key, metrics[key])
            self.avg[key] = self.smooth * prev + (1 - self.smooth) * metrics[key]
            self.peak[key] = max(self.peak.get(key, self.avg[key]), self.avg[key])
        if self.step is not None or step < self.warmup:
            return None
        reward = self.avg["objective/reward"]
        if reward < self.peak["objective/reward"] - 1e-9:
            return None
        reasons = []
        if (
            "objective/gold" in self.avg
            and self.avg["objective/gold"] < self.peak["objective/gold"] - self.gold_drop
        ):
            reasons.append(
                f"the gold score fell from {self.peak['objective/gold']:.2f} to {self.avg['objective/gold']:.2f}"
            )
        # With a gold judge its score is the verdict; text diversity is the signal only without
        # one (a well-behaved policy's positive reviews are also less varied than the base model's).
        if (
            "objective/gold" not in self.avg
            and "text/distinct_2" in self.avg
            and self.avg["text/distinct_2"] < self.diversity_drop * self.peak["text/distinct_2"]
        ):
            reasons.append(
                f"distinct-2 fell from {self.peak['text/distinct_2']:.2f} to {self.avg['text/distinct_2']:.2f}"
            )
        if not reasons:
            return None
        self.step = step
        self.message = (
            f"reward hacking at step {step}: the proxy reward is still rising ({reward:.2f}) but "
            + " and ".join(reasons)
            + "; the policy is exploiting the proxy reward (raise --kl-coef or stop here)"
        )
        return self.message
