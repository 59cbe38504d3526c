"""The RL training loop.

config      `PPOConfig`, `PPORunConfig`, the KL controllers
trainer     `PPOTrainer`: rollout -> score -> KL-penalised rewards -> advantages -> PPO epochs
inputs      loading and checking a run's prompts and models
run         `train_ppo` (`rlhf ppo`), `ppo_step`, the prompt stream, Ctrl-C handling
checkpoint  atomic checkpoints and exact resume
detector    `HackingDetector`, the live reward-hacking warning
rollout     the rollout batch, and how its pieces are padded, joined and gathered
distributed the processes a run is spread over (`World`, `TorchWorld`), DDP and FSDP2 wrapping
launch      joining the process group under torchrun
sharded_state  checkpoints of sharded runs (torch.distributed.checkpoint), the gathered policy
"""
