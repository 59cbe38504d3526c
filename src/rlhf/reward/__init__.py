"""Reward modelling: preference data and Bradley-Terry training and evaluation.

preferences  `create_preference_dataset` (pairs sampled and labelled by the gold judge)
loss         `reward_model_loss`, scoring texts, held-out evaluation
train        `RewardConfig`, `train_reward` (`rlhf train-reward`)
"""
