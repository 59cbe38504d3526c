"""What reads finished runs: figures, the reward-hacking experiment, the KL sweep and the report.

series   reading metrics.jsonl and smoothing
plots    `plot_reward_kl_tradeoff`, `plot_runs`, `plot_diagnostics`, `plot_run_dir`
hacking  `demonstrate_reward_hacking`, run summaries
sweep    `rlhf sweep`: the reward-KL frontier with best-of-n and the Gao et al. fits
report   report.md of `rlhf demo`
generate `rlhf generate`: a policy found in a run, model or adapter folder, sampled reproducibly
evaluate `rlhf eval`: policy against baseline, win rate with its interval, reward, KL, gold
"""
