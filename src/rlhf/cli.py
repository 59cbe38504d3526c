"""The `rlhf` command: parses options into the stages' config dataclasses and calls them.

Every option comes from a dataclass field; its help is the field's docstring (`cli_options`).
Errors the user can fix (`RLHFError`) print as one line on stderr and exit with code 2, without a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import sys
import typing
from pathlib import Path

from .analysis.sampling_config import EvalConfig, GenerateConfig
from .analysis.sweep_config import SweepConfig
from .cli_options import (
    DPO_HELP_GROUPS,
    EVAL_HELP_GROUPS,
    EXAMPLES,
    GENERATE_HELP_GROUPS,
    PPO_EXAMPLES,
    PPO_HELP_GROUPS,
    REWARD_EXAMPLES,
    REWARD_HELP_GROUPS,
    SERVE_HELP_GROUPS,
    SFT_HELP_GROUPS,
    add_config_arguments,
    add_config_file_argument,
    add_threads_argument,
    config_from_args,
    wrap,
)
from .cli_options import field_docs as field_docs  # re-exported
from .errors import RLHFError
from .reward.config import RewardConfig
from .reward.serve import ServeRewardConfig
from .rl.config import METHOD_NAMES, PPORunConfig
from .rl.dpo_config import DPOConfig
from .sft.config import SFTConfig

DEMO_EXAMPLES = """\
examples:
  rlhf demo                      reward model, PPO with and without the KL penalty, side runs, plots
                                 and runs/demo/report.md (minutes on 2 quiet cores)
  rlhf demo --quick              the same pipeline at smoke size, in runs/demo-quick
  rlhf demo --seed 1 --out runs/demo-seed1
                                 another seed, beside the first (a rerun reuses the cached models)
"""

DPO_EXAMPLES = """\
examples:
  rlhf dpo --out runs/dpo        the built-in task: pairs sampled from the base model, labelled by
                                 the gold judge, gold and KL measured on fresh samples at the end
  rlhf dpo --model ./my-sft-model --data prefs.jsonl --out runs/dpo
                                 your SFT model and preference file
  rlhf dpo --model ./my-sft-model --data prefs.jsonl --lora-r 8 --lr 3e-3 --out runs/dpo-lora
                                 LoRA adapters, which need a larger learning rate
  rlhf dpo --loss-type ipo --beta 0.1 --out runs/ipo
                                 IPO's squared loss instead of DPO's logistic one
"""

SFT_EXAMPLES = """\
examples:
  rlhf sft --data docs/examples/sft-reviews.jsonl --lr 1e-3 --out runs/sft
                                 the built-in base model on a small prompt/completion file
  rlhf sft --model ./my-base --data chats.jsonl --lora-r 16 --out runs/sft
                                 your base model on conversations ({"messages": [...]}), with LoRA;
                                 the loss is on the assistant turns
  rlhf train-reward --model runs/sft/model --data prefs.jsonl --out runs/rm
  rlhf ppo --model runs/sft/model --reward-model runs/rm --prompts prompts.txt --out runs/ppo
                                 then the reward model and PPO start from the SFT model
"""

PLOT_EXAMPLES = """\
examples:
  rlhf plot runs/ppo             the reward/KL trade-off and the diagnostics of one PPO run
  rlhf plot runs/dpo             the loss, accuracy and implicit rewards of a DPO run
  rlhf plot runs/demo            every run inside the demo's folder
"""

SWEEP_EXAMPLES = """\
examples:
  rlhf sweep                     PPO at five KL coefficients and best-of-n, one seed (about 4 minutes)
  rlhf sweep --algos gae,rloo,grpo,reinforce_pp,dpo,best_of_n --kl-coefs 0,0.03,0.1 --seeds 3
                                 every method, three seeds each; run it again to resume
"""

GENERATE_EXAMPLES = """\
examples:
  rlhf generate runs/ppo         8 of the built-in task's held-out openings, one response each
  rlhf generate runs/ppo --prompt "the acting was" --prompt "this phone" --num-samples 4
                                 prompts on the command line, 4 responses each
  rlhf generate ./my-model --prompts prompts.txt --temperature 0.7 --top-p 0.9 --out samples.jsonl
                                 a Hugging Face model folder on your prompt file
  rlhf generate runs/ppo-lora/policy --base-model ./my-sft-model --prompts prompts.txt
                                 a LoRA adapter, on the base model it was trained from
"""

SERVE_REWARD_EXAMPLES = """\
examples:
  rlhf serve-reward --reward-model runs/rm --port 8000
  rlhf ppo --reward-url http://127.0.0.1:8000/get_reward --out runs/ppo
                                 the reward model in another process; the trainer loads none
  rlhf serve-reward --reward-model runs/rm --host 0.0.0.0 --port 5000 --device cuda
                                 on a GPU machine, for trainers elsewhere (OpenRLHF's included:
                                 --reward.remote_url http://THIS-HOST:5000/get_reward)
"""

EVAL_EXAMPLES = """\
examples:
  rlhf eval runs/ppo             the built-in task: 256 held-out prompts, the run's reward model,
                                 the gold judge; against the model the run started from
  rlhf eval runs/ppo --baseline runs/dpo
                                 which of two runs is better, each with its KL to the reference
  rlhf eval runs/ppo --prompts held-out.jsonl --reward-model runs/rm --out runs/ppo/eval-mine
                                 your held-out prompts and reward model
  rlhf eval ./my-policy --baseline ./my-sft-model --ref-model ./my-sft-model --reward-model runs/rm
                                 plain model folders name their reference and baseline
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first),
    and an unknown option is reported by its subcommand, so the line names that command's --help."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> typing.NoReturn:
        self.exit(
            2,
            f"{self.prog}: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n",
        )

    def _suggestion(self, message: str) -> str:
        """ ", did you mean ...?" for a misspelt command name (argparse's "invalid choice")."""
        if "invalid choice:" not in message or not self.commands:
            return ""
        typed = message.split("invalid choice:", 1)[1].split("'")[1]
        close = difflib.get_close_matches(typed, list(self.commands), n=1)
        return f"; did you mean '{close[0]}'?" if close else ""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.commands.get(getattr(parsed, "command", None), self)
            options = [o for o in command._option_string_actions if o.startswith("--")]
            hints = []
            for arg in unknown:
                typed = arg.split("=", 1)[0]
                if typed.startswith("--"):
                    close = difflib.get_close_matches(typed, options, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{typed}: did you mean {close[0]}?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlhf",
        description=wrap(
            "Reinforcement Learning from Human Feedback with PPO. With no options every command runs "
            "on a built-in task that needs no downloads: make short film and product reviews positive, "
            "judged by a hidden 'gold' scorer that stands in for the human."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in task and write a report",
        description="Run every stage on the built-in task, reusing cached stages, and say what was made.",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--out", default=None, help="output folder (default: runs/demo, or runs/demo-quick)"
    )
    demo.add_argument("--quick", action="store_true", help="smoke-sized run of the same pipeline")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for every stage (default: 0); the same seed gives the same numbers on the same "
        "machine and torch build, not across machines",
    )
    demo.add_argument("--cache-dir", default=None, help="cache for the built-in base model")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    demo.add_argument(
        "--task",
        choices=("reviews", "arithmetic"),
        default="reviews",
        help="reviews: make film and product reviews positive, judged by a sentiment gold "
        "judge (default); arithmetic: answer sums, rewarded by a verifier, judged exactly "
        "(runs/demo-arithmetic)",
    )
    demo.add_argument(
        "--report-to",
        default="tensorboard",
        help="where each PPO run's metrics go besides its metrics.jsonl: tensorboard, wandb, "
        "mlflow, trackio or none, several comma-separated (default: tensorboard)",
    )

    sft = sub.add_parser(
        "sft",
        help="supervised fine-tuning: teach a base model to imitate examples (the first stage)",
        description=wrap(
            "Fine-tune a causal language model on examples to imitate, by next-token cross-entropy "
            "on the completions (or the assistant's turns) only. Reads TRL's forms: {\"text\"}, "
            '{"prompt", "completion"} and {"messages"} (rendered with the chat template). '
            "Writes model/ (what train-reward, ppo and dpo take as --model), config.json, "
            "metrics.jsonl, sft_eval.json (held-out loss before and after) and samples.jsonl to --out."
        ),
        usage="rlhf sft --data FILE [options]",
        epilog=SFT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(sft, SFTConfig, groups=SFT_HELP_GROUPS)

    reward = sub.add_parser(
        "train-reward",
        help="train a reward model from preference pairs",
        description=wrap(
            "Train a scalar reward model with the Bradley-Terry loss. With no --data, pairs are sampled "
            "from the built-in base model and labelled by the gold judge. Writes the model, config.json, "
            "metrics.jsonl, TensorBoard logs and reward_eval.json to --out."
        ),
        usage="rlhf train-reward [options]",
        epilog=REWARD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(reward, RewardConfig, groups=REWARD_HELP_GROUPS)

    ppo = sub.add_parser(
        "ppo",
        help="fine-tune a policy with PPO against a reward model, with a KL penalty",
        description=wrap(
            "PPO (or RLOO, GRPO, REINFORCE++ by --advantage-estimator) with a per-token KL penalty to a "
            "frozen reference. The reward comes from a reward model, Python functions (--reward-fn) or a "
            "reward server (--reward-url), weighted and summed. With no options it runs on the built-in "
            "task (training its reward model first if the cache has none). Writes metrics.jsonl, "
            "samples.jsonl, config.json, TensorBoard logs and the final policy (Hugging Face format) to --out; "
            "a folder that holds an earlier run is replaced unless --resume is given."
        ),
        usage="rlhf ppo [options]",
        epilog=PPO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # top-k, top-p and LoRA dropout can only be refused (rl.config says why); not listed.
    add_config_arguments(
        ppo, PPORunConfig, groups=PPO_HELP_GROUPS, hidden=("top_k", "top_p", "lora_dropout")
    )

    dpo = sub.add_parser(
        "dpo",
        help="fine-tune a policy directly on preference pairs with DPO (or IPO), no reward model",
        description=wrap(
            "Direct Preference Optimization against a frozen reference. With no --data, pairs are sampled "
            "from the built-in base model and labelled by the gold judge, as train-reward makes them. Writes "
            "the policy (Hugging Face format), config.json, metrics.jsonl and dpo_eval.json (held-out "
            "implicit-reward accuracy before and after; on the built-in task the gold score and the KL to "
            "the reference on fresh samples) to --out."
        ),
        epilog=DPO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(dpo, DPOConfig, groups=DPO_HELP_GROUPS)

    plot = sub.add_parser(
        "plot",
        help="draw a finished run: PPO's reward/KL trade-off and diagnostics, other runs' curves",
        description=wrap(
            "Read RUN_DIR/metrics.jsonl and draw it beside it: a PPO run's reward_kl_tradeoff.png and "
            "training_diagnostics.png, an SFT, reward-model or DPO run's training_curves.png. A folder "
            "of runs (such as runs/demo) has every run inside it plotted."
        ),
        epilog=PLOT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="output folder of `rlhf ppo`, `sft`, `train-reward` or `dpo`, or a folder of such folders",
    )

    generate = sub.add_parser(
        "generate",
        help="sample responses from a policy (a run, a model folder or a LoRA adapter)",
        description=wrap(
            "Sample responses from a policy: a run folder (rlhf ppo, dpo or sft --out; its policy/ "
            "or model/ is used, with the run's chat template and response length), a Hugging Face "
            "model folder, a LoRA adapter folder (put on its base model) or a merged model. Prompts "
            "come from --prompt TEXT (repeated) or --prompts FILE; on the built-in task, its "
            "held-out openings. Every row has its own seeded draws, so the same --seed gives the same "
            "responses whatever --batch-size. Writes {prompt, response, ended, ...} rows as JSONL "
            "and prints the first few."
        ),
        usage="rlhf generate POLICY [--prompt TEXT ...] [options]",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate_docs = field_docs(GenerateConfig)
    generate.add_argument("policy", nargs="?", metavar="POLICY", help=generate_docs["policy"])
    add_config_arguments(
        generate, GenerateConfig, skip=("policy", "prompt"), groups=GENERATE_HELP_GROUPS
    )
    inputs = next(g for g in generate._action_groups if g.title == "inputs")
    inputs.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help=generate_docs["prompt"]
    )

    evaluate = sub.add_parser(
        "eval",
        help="compare a policy with a baseline: win rate, reward, KL, gold, length, diversity",
        description=wrap(
            "Compare a policy with a baseline (by default its reference, the model the run started "
            "from) on held-out prompts: both sample one response per prompt from the same seeded "
            "draws, so each prompt is a paired comparison. Reports the win rate under the reward "
            "model (ties count half) with a 95% Wilson interval, each side's mean reward, KL to the "
            "reference (k1 summed over response tokens, nats), response length, EOS rate and "
            "distinct-2, and on the built-in task the gold judge's score and win rate. Defaults "
            "come from the run: its reward model, chat template and response length; on the "
            "built-in task, 256 held-out openings. Prints a table and writes eval.json (numbers, "
            "per-prompt scores, the resolved options) and eval.png to --out."
        ),
        usage="rlhf eval POLICY [options]",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "policy", nargs="?", metavar="POLICY", help=field_docs(EvalConfig)["policy"]
    )
    add_config_arguments(evaluate, EvalConfig, skip=("policy",), groups=EVAL_HELP_GROUPS)

    serve = sub.add_parser(
        "serve-reward",
        help="serve a trained reward model over HTTP, for rlhf ppo --reward-url (OpenRLHF's protocol)",
        description=wrap(
            "Load a reward model trained by `rlhf train-reward` and answer OpenRLHF's remote reward "
            'model protocol: POST /get_reward with {"query": [prompt + response, ...], "prompts": '
            '[...], "labels": [...]} is answered with {"rewards": [...]}, one score per query, read '
            "as `rlhf ppo` reads them in-process. GET /health says what is served. Prints the URL to "
            "give `rlhf ppo --reward-url` once the model is loaded; a trainer whose server goes away "
            "mid-run retries, then checkpoints and says how to resume."
        ),
        usage="rlhf serve-reward --reward-model DIR [--host HOST] [--port PORT] [options]",
        epilog=SERVE_REWARD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(serve, ServeRewardConfig, groups=SERVE_HELP_GROUPS)

    sweep = sub.add_parser(
        "sweep",
        help="every method on one reward-KL frontier: PPO, RLOO, GRPO, REINFORCE++, DPO, best-of-n",
        description=wrap(
            "On the built-in task, run each method of --algos once per coefficient (--kl-coefs; DPO: "
            "--dpo-betas) and seed, and plot the gold and proxy score against d = sqrt(KL to the "
            "reference), mean and band over seeds, with the functional forms of Gao, Schulman and "
            "Hilton (2022) fitted (R^2 in the legend). Every RL step samples --sequences responses. "
            "Writes sweep.png, sweep.json and one folder per run to --out; a finished run is read "
            "back, not run again, so the same command resumes an interrupted sweep."
        ),
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(sweep, SweepConfig)
    for name, command in sub.choices.items():
        if name != "plot":  # plotting reads files; the others train
            add_config_file_argument(command)
            add_threads_argument(command)
    parser.commands = sub.choices
    return parser


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n:,} {noun}s"


def _figures(run_dir: Path) -> list[Path]:
    """The run's figures (`rlhf plot RUN_DIR`), drawn at its end for the trackers."""
    from .analysis.plots import plot_run_dir

    return plot_run_dir(run_dir)


def _run_sft(args) -> None:
    from .sft.train import train_sft

    cfg = config_from_args(SFTConfig, args)
    result = train_sft(cfg, figures=_figures)
    out = Path(cfg.out)
    before, after = result["before"], result["after"]
    samples = f"\n  samples: {out / 'samples.jsonl'}" if (out / "samples.jsonl").is_file() else ""
    adapter = f"\n  adapter: {out / 'adapter'}" if cfg.lora_r else ""
    print(
        f"SFT: {_count(result['steps'], 'step')} in {result['seconds']:.0f} s; held-out loss "
        f"{before['loss']:.3f} -> {after['loss']:.3f} per token (perplexity {before['perplexity']:.1f} "
        f"-> {after['perplexity']:.1f}) on {_count(result['n_eval'], 'example')}\n"
        f"  model:   {out / 'model'} (give it to train-reward, ppo or dpo as --model){adapter}\n"
        f"  eval:    {out / 'sft_eval.json'}\n"
        f"  metrics: {out / 'metrics.jsonl'}{samples}"
    )


def _figure_note(out: Path, name: str) -> str:
    """Where the run's figure is, or how to draw it (with --report-to none nothing is drawn)."""
    if (out / name).is_file():
        return f"\n  figures: {out / name} (redraw with: rlhf plot {out})"
    return f" (plot with: rlhf plot {out})"


def _run_train_reward(args) -> None:
    from .reward.train import train_reward

    cfg = config_from_args(RewardConfig, args)
    result = train_reward(cfg, figures=_figures)
    out = Path(cfg.out)
    if result.get("ceiling") is None:  # the user's data: no gold judge to compare with
        meaning = "the chosen response scores higher in that share of the held-out pairs"
    else:
        meaning = (
            f"agreement with the gold judge's ordering; the noisy training labels themselves "
            f"agree with it {result['ceiling']:.3f} of the time, the most to expect"
        )
    print(
        f"reward model: held-out accuracy {result['accuracy']:.3f} ({meaning}), "
        f"{result['seconds']:.0f} s\n"
        f"  model:   {out / 'reward_model'}\n"
        f"  eval:    {out / 'reward_eval.json'}\n"
        f"  metrics: {out / 'metrics.jsonl'} (tensorboard --logdir {out / 'tensorboard'})"
    )


def _run_demo(args) -> None:
    from .pipeline import run_demo

    run_demo(
        out=args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir,
        device=args.device, report_to=args.report_to, task=args.task,
    )  # fmt: skip


def _run_ppo(args) -> None:
    from .rl.run import train_ppo

    cfg = config_from_args(PPORunConfig, args)
    summary = train_ppo(cfg, figures=_figures)
    final, out = summary["final"], Path(cfg.out)
    gold = f", gold {final['objective/gold']:.3f}" if "objective/gold" in final else ""
    resumed = (
        f" (resumed from step {summary['first_step']}; the run now has {summary['total_steps']})"
        if summary["first_step"]
        else ""
    )
    print(
        f"{METHOD_NAMES[cfg.advantage_estimator]}: {_count(summary['steps'], 'step')} in {summary['seconds']:.0f} s{resumed}; last step reward "
        f"{final['objective/reward']:.3f}, KL {final['objective/kl']:.2f} nats{gold}\n"
        f"  policy:  {out / 'policy'}\n"
        f"  metrics: {out / 'metrics.jsonl'}{_figure_note(out, 'reward_kl_tradeoff.png')}\n"
        f"  samples: {out / 'samples.jsonl'}"
    )


def _run_dpo(args) -> None:
    from .rl.dpo import train_dpo

    cfg = config_from_args(DPOConfig, args)
    result = train_dpo(cfg, figures=_figures)
    out = Path(cfg.out)
    before, after = result["before"]["accuracy"], result["after"]["accuracy"]
    tied = (
        " (every pair tied: the policy was the reference)" if result["before"]["ties"] == 1 else ""
    )
    gold = ""
    if "policy" in result:
        gold = (
            f"; on fresh samples gold {result['policy']['gold']:.3f} (reference "
            f"{result['reference']['gold']:.3f}), KL {result['policy']['kl']:.2f} nats"
        )
    print(
        f"DPO: {_count(result['steps'], 'step')} in {result['seconds']:.0f} s; held-out implicit-reward "
        f"accuracy {before:.3f}{tied} -> {after:.3f}{gold}\n"
        f"  policy:  {out / 'policy'}\n"
        f"  eval:    {out / 'dpo_eval.json'}\n"
        f"  metrics: {out / 'metrics.jsonl'}"
    )


def _run_plot(args) -> None:
    from .analysis.plots import find_runs, plot_run_dir

    run_dir = Path(args.run_dir)
    runs = [run_dir] if (run_dir / "metrics.jsonl").is_file() else find_runs(run_dir)
    if runs != [run_dir]:
        names = ", ".join(str(r.relative_to(run_dir)) for r in runs)
        print(f"{run_dir} has no metrics.jsonl; plotting the {len(runs)} runs inside it: {names}")
    for run in runs:
        for path in plot_run_dir(run):
            print(f"wrote {path}")


def _run_serve_reward(args) -> None:
    from .reward.serve import serve_reward

    serve_reward(config_from_args(ServeRewardConfig, args))


def _run_sweep(args) -> None:
    from .analysis.frontier import alarm_table, frontier_sweep, peak_table
    from .tracking import save_options

    cfg = config_from_args(SweepConfig, args)
    plan = cfg.plan()
    base = PPORunConfig(lr=cfg.lr, seed=cfg.seed, cache_dir=cfg.cache_dir, report_to=cfg.report_to)
    base.validate()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    save_options(cfg.out, "sweep", dataclasses.asdict(cfg))
    result = frontier_sweep(plan, out=cfg.out, base=base)
    out = Path(cfg.out)
    alarms = alarm_table(result)
    print(
        f"sweep: {', '.join(plan.methods)} over {plan.seeds} seed(s)\n{peak_table(result)}\n"
        + (f"disagreement alarm, per setting:\n{alarms}\n" if alarms else "")
        + f"  figure:  {out / 'sweep.png'}\n  numbers: {out / 'sweep.json'}"
    )


def _run_generate(args) -> None:
    from .analysis.generate import format_rows, generate

    cfg = config_from_args(GenerateConfig, args)
    result = generate(cfg)
    rows, out = result["rows"], result["out"]
    if cfg.show:
        print(format_rows(rows, cfg.show))
    n_prompts = len(rows) // cfg.num_samples
    replaced = " (replacing the file that was there)" if result["replaced"] else ""
    source = result["source"]
    plain = source.run_dir is None and source.base_dir is None  # no reference is known
    compare = " --baseline DIR --reward-model DIR" if plain else ""
    print(
        f"generate: {_count(len(rows), 'response')} to {_count(n_prompts, 'prompt')} from "
        f"{result['prompts_from']}, at most {result['response_tokens']} tokens, from "
        f"{result['policy']}\n"
        f"  responses: {out}{replaced}\n"
        f"  compare the policy with {'a baseline' if plain else 'its reference'}: "
        f"rlhf eval {cfg.policy}{compare}"
    )


def _run_eval(args) -> None:
    from .analysis.eval_report import format_table
    from .analysis.evaluate import evaluate

    cfg = config_from_args(EvalConfig, args)
    result = evaluate(cfg)
    out, models = result["out"], result["models"]
    replaced = ""
    if result["replaced"] is not None:
        earlier = result["replaced"]["win_rate"]
        was = f", whose win rate was {100 * earlier:.1f}%" if earlier is not None else ""
        replaced = f"\n  (replaced the earlier evaluation in {out}{was})"
    print(
        f"eval: {_count(result['policy']['n'], 'prompt')} from {result['prompts_from']}, "
        f"{result['seconds']:.0f} s\n"
        f"  policy:   {models['policy']}\n  baseline: {models['baseline']}\n"
        f"  reward model: {models['reward_model'] or 'none'}\n\n"
        f"{format_table(result)}\n\n"
        f"  numbers: {out / 'eval.json'} (per-prompt responses and scores in per_prompt)\n"
        f"  figure:  {out / 'eval.png'}{replaced}\n"
        f"  read the responses themselves with: rlhf generate {cfg.policy}"
    )


COMMANDS = {
    "demo": _run_demo,
    "sft": _run_sft,
    "train-reward": _run_train_reward,
    "ppo": _run_ppo,
    "dpo": _run_dpo,
    "plot": _run_plot,
    "sweep": _run_sweep,
    "serve-reward": _run_serve_reward,
    "generate": _run_generate,
    "eval": _run_eval,
}


def _quiet_transformers() -> None:
    """No "Loading weights" bars from transformers: the commands draw their own progress."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers imports
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted `rlhf ppo`: the same options plus --resume."""
    args = [a for a in argv if a != "--no-resume"]
    if "--resume" not in args:
        args.append("--resume")
    # Said the way it was typed: `python -m rlhf` runs rlhf/__main__.py as the main module.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec is not None and spec.name == "rlhf.__main__"
    prog = "python -m rlhf" if module else "rlhf"
    # A torchrun worker cannot see torchrun's own options; say where they go.
    if "TORCHELASTIC_RUN_ID" in os.environ:
        prog = f"torchrun <the same torchrun options> {'-m rlhf' if module else sys.argv[0]}"
    return f"{prog} {shlex.join(args)}"


def _rank_zero() -> bool:
    """Whether this process prints: always, except ranks 1..N under torchrun (as in rl.launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    """Run `rlhf ARGV` and return its exit code.

    Without `argv` (the `rlhf` program, `python -m rlhf`), a torchrun worker does not return:
    it leaves with `rl.launch.exit_worker`, which ends the process with the same code.
    """
    if argv is not None:
        return _main(list(argv))
    try:
        code = _main(sys.argv[1:])
    except Exception:
        if not _torchrun_worker():
            raise
        sys.excepthook(*sys.exc_info())  # the traceback Python would print, then exit code 1
        code = 1
    if _torchrun_worker():
        from .rl.launch import exit_worker  # imported already by the command that ran

        exit_worker(code)
    return code


def _set_threads(requested: int) -> None:
    """torch's intra-op threads: --threads, $OMP_NUM_THREADS as given, or the cores idle now."""
    import torch

    from . import machine

    env = os.environ.get("OMP_NUM_THREADS", "")
    if not requested and env.isdigit() and int(env) > 0:
        threads, why = int(env), "$OMP_NUM_THREADS"  # torchrun sets 1; a user who set it meant it
    else:
        threads, why = machine.choose_threads(requested, torch.get_num_threads())
    torch.set_num_threads(threads)
    machine.CHOSEN = why


def _torchrun_worker() -> bool:
    """Whether `rl.launch.init_world` started a process group here (a command that ran it has
    imported `rl.launch`; looked up, not imported, so that `rlhf --help` stays light)."""
    launch = sys.modules.get("rlhf.rl.launch")
    return launch is not None and launch.started_group()


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "config", None):
        # The file's values become the command's defaults, so the command line still wins.
        from .cli_config import read_config_file

        command = parser.commands[args.command]
        try:
            command.set_defaults(**read_config_file(args.config, command))
        except RLHFError as exc:
            if _rank_zero():
                print(f"rlhf {args.command}: error: {exc}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    if hasattr(args, "threads"):
        _set_threads(args.threads)
    speaks = _rank_zero()
    if not speaks:  # under torchrun, rank 0 alone prints (progress bars are off elsewhere)
        sys.stdout = open(os.devnull, "w")
    try:
        if args.command in ("demo", "train-reward", "sweep"):
            from .rl.launch import require_one_process

            require_one_process(args.command)
        COMMANDS[args.command](args)
    except RLHFError as exc:
        code = getattr(exc, "exit_code", 2)  # 130 for Ctrl-C (rl.run.Interrupted)
        label = "error: " if code == 2 else ""
        message = str(exc)
        if getattr(exc, "resumable", False) and args.command == "ppo":
            message = f"{exc.what}. Continue with: {resume_command(argv)}"
        elif code == 130 and args.command != "ppo":
            # Only `rlhf ppo` has --resume; demo and sweep rerun their PPO runs from the start.
            message = (
                "interrupted; the cached base and reward models are kept, so running the same "
                "command again redoes only the PPO runs"
            )
        if speaks:
            print(f"rlhf {args.command}: {label}{message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if speaks:
            print(f"\nrlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
