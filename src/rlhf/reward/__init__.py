"""Reward modelling: preference data and Bradley-Terry training and evaluation.

preferences  `create_preference_dataset` (pairs sampled and labelled by the gold judge)
loss         `reward_model_loss`, scoring texts, held-out evaluation
config       `RewardConfig`, the options of `rlhf train-reward`
train        `train_reward` (`rlhf train-reward`; `RewardConfig` importable from here too)
"""
