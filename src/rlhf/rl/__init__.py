"""The RL training loop.

config         `PPOConfig`, `PPORunConfig`, the KL controllers
trainer        `PPOTrainer`: rollout -> score -> KL-penalised rewards -> advantages -> PPO epochs
rollout        the rollout batch, and how its pieces are padded, joined and gathered
advantages     per-token rewards and advantages: gae, rloo, grpo, dr_grpo, reinforce_pp
update         the PPO epochs: minibatches of micro-batches, the loss and its statistics
inputs         loading and checking a run's prompts and models
run            `train_ppo` (`rlhf ppo`), the prompt stream, Ctrl-C handling
step           `ppo_step`, the seed's one-call form
checkpoint     atomic checkpoints and exact resume
sharded_state  checkpoints of sharded runs (torch.distributed.checkpoint), the gathered policy
distributed    the processes a run is spread over (`World`, `TorchWorld`), DDP and FSDP2 wrapping
launch         joining the process group under torchrun
detector       `HackingDetector`, the live reward-hacking warning
dpo            `train_dpo` (`rlhf dpo`): Direct Preference Optimization, no reward model
"""
