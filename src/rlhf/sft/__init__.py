"""Supervised fine-tuning (`rlhf sft`): a base model learns to imitate examples before the reward
model and PPO. `config` holds the options (no torch), `train` the training."""
