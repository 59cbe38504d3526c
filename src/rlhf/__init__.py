"""rlhf: Reinforcement Learning from Human Feedback with PPO."""

__version__ = "0.1.0"
