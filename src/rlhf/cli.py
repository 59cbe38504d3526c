"""The `rlhf` command: parses options into the stages' config dataclasses and calls them.

Every option comes from a dataclass field; its help is the field's docstring. Errors the user can
fix (`RLHFError`) print as one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
import types
import typing
from functools import cache
from pathlib import Path

from .errors import ConfigError, RLHFError
from .reward.train import RewardConfig
from .rl.config import PPORunConfig

EXAMPLES = """\
examples:
  rlhf demo                      the whole story on the built-in task: reward model, PPO with and
                                 without the KL penalty, plots and report.md (about 5 minutes)
  rlhf demo --quick              the same pipeline at smoke size (under a minute)
  rlhf train-reward --out runs/rm
  rlhf train-reward --data prefs.jsonl --model ./my-sft-model --out runs/rm
"""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (the string literal that follows it)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One `--option` per dataclass field, typed, with the field's default and docstring."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(
                flag, choices=choices, default=default, help=f"{help_text} (default: {default})"
            )
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(
                flag, type=tp, default=default, metavar=f.name.upper(), help=help_text + shown
            )


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    values.update(overrides)
    return cls(**values)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first),
    and an unknown option is reported by its subcommand, so the line names that command's --help."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.commands.get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlhf",
        description=(
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
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="smoke-sized run of the same pipeline")
    demo.add_argument("--seed", type=int, default=0, help="seed for every stage (default: 0)")
    demo.add_argument("--cache-dir", default=None, help="cache for the built-in base model")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")

    reward = sub.add_parser(
        "train-reward",
        help="train a reward model from preference pairs",
        description=(
            "Train a scalar reward model with the Bradley-Terry loss. With no --data, pairs are sampled "
            "from the built-in base model and labelled by the gold judge. Writes the model, config.json, "
            "metrics.jsonl, TensorBoard logs and reward_eval.json to --out."
        ),
    )
    add_config_arguments(reward, RewardConfig)

    ppo = sub.add_parser(
        "ppo",
        help="fine-tune a policy with PPO against a reward model, with a KL penalty",
        description=(
            "PPO with a per-token KL penalty to a frozen reference. With no options it runs on the built-in "
            "task (training its reward model first if the cache has none). Writes metrics.jsonl, "
            "samples.jsonl, config.json, TensorBoard logs and the final policy (Hugging Face format) to --out."
        ),
    )
    add_config_arguments(ppo, PPORunConfig)

    plot = sub.add_parser(
        "plot",
        help="draw the reward/KL trade-off and training diagnostics of a finished run",
        description="Read RUN_DIR/metrics.jsonl and write reward_kl_tradeoff.png and training_diagnostics.png beside it.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `rlhf ppo`")

    sweep = sub.add_parser(
        "sweep",
        help="the reward-KL frontier: one PPO run per KL coefficient, plus best-of-n",
        description=(
            "Run PPO once per --kl-coefs value on the built-in task, sample a best-of-n baseline from the "
            "reference, and plot gold and proxy score against d = sqrt(KL) with the functional forms of "
            "Gao, Schulman and Hilton (2022) fitted. Writes sweep.png and sweep.json to --out."
        ),
    )
    sweep.add_argument(
        "--kl-coefs",
        default="0,0.01,0.03,0.1,0.3",
        help="comma-separated KL coefficients (default: 0,0.01,0.03,0.1,0.3)",
    )
    sweep.add_argument("--steps", type=int, default=60, help="PPO steps per run (default: 60)")
    sweep.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate (default: 1e-4)")
    sweep.add_argument("--out", default="runs/sweep", help="output folder (default: runs/sweep)")
    sweep.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    sweep.add_argument(
        "--cache-dir", default=None, help="cache for the built-in base and reward models"
    )
    parser.commands = sub.choices
    return parser


def _run_train_reward(args) -> None:
    from .reward.train import train_reward

    cfg = config_from_args(RewardConfig, args)
    result = train_reward(cfg)
    out = Path(cfg.out)
    ceiling = "n/a" if result.get("ceiling") is None else f"{result['ceiling']:.3f}"
    print(
        f"reward model: held-out accuracy {result['accuracy']:.3f} (label ceiling {ceiling}), "
        f"{result['seconds']:.0f} s\n"
        f"  model:   {out / 'reward_model'}\n"
        f"  eval:    {out / 'reward_eval.json'}\n"
        f"  metrics: {out / 'metrics.jsonl'} (tensorboard --logdir {out / 'tensorboard'})"
    )


def _run_demo(args) -> None:
    from .pipeline import run_demo

    run_demo(
        out=args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, device=args.device
    )


def _run_ppo(args) -> None:
    from .rl.run import train_ppo

    cfg = config_from_args(PPORunConfig, args)
    summary = train_ppo(cfg)
    final, out = summary["final"], Path(cfg.out)
    gold = f", gold {final['objective/gold']:.3f}" if "objective/gold" in final else ""
    print(
        f"PPO: {summary['steps']} steps in {summary['seconds']:.0f} s; last step reward "
        f"{final['objective/reward']:.3f}, KL {final['objective/kl']:.2f} nats{gold}\n"
        f"  policy:  {out / 'policy'}\n"
        f"  metrics: {out / 'metrics.jsonl'} (plot with: rlhf plot {out})\n"
        f"  samples: {out / 'samples.jsonl'}"
    )


def _run_plot(args) -> None:
    from .analysis.plots import plot_run_dir

    for path in plot_run_dir(args.run_dir):
        print(f"wrote {path}")


def _parse_kl_coefs(text: str) -> list[float]:
    try:
        coefs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--kl-coefs: expected comma-separated numbers such as 0,0.03,0.1, got {text!r}"
        ) from None
    if not coefs or any(not math.isfinite(c) or c < 0 for c in coefs):
        raise ConfigError(f"--kl-coefs: expected one or more numbers >= 0, got {text!r}")
    return coefs


def _run_sweep(args) -> None:
    from .analysis.sweep import fit_terms, kl_sweep

    coefs = _parse_kl_coefs(args.kl_coefs)
    if args.steps <= 0:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    base = PPORunConfig(lr=args.lr, seed=args.seed, cache_dir=args.cache_dir)
    base.validate()
    result = kl_sweep(coefs, out=args.out, steps=args.steps, seed=args.seed, base=base)
    fit = result["fit_rl"]
    out = Path(args.out)
    print(
        f"sweep: {len(coefs)} PPO runs of {args.steps} steps and best-of-n up to "
        f"n={result['best_of_n'][-1]['n']}; gold fit R(d) = d "
        f"({fit_terms(fit['a'], fit['b'], 'log d', 3)})\n  figure: {out / 'sweep.png'}\n  numbers: {out / 'sweep.json'}"
    )


COMMANDS = {
    "demo": _run_demo,
    "train-reward": _run_train_reward,
    "ppo": _run_ppo,
    "plot": _run_plot,
    "sweep": _run_sweep,
}


def _quiet_transformers() -> None:
    """No "Loading weights" bars from transformers: the commands draw their own progress."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers imports
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def _rank_zero() -> bool:
    """Whether this process prints: always, except ranks 1..N under torchrun (as in rl.launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
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
        if code == 130 and args.command != "ppo":
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
