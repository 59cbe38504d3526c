"""The options of the `rlhf` commands: dataclass fields as `--options`, grouped for `--help`, and
the help texts (examples, what a seed fixes, where "(ppo-details N)" points).

Every option comes from a dataclass field; its help is the field's docstring (`field_docs`).
`cli` builds the parser from these and dispatches.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache

EXAMPLES = """\
examples:
  rlhf demo                      the whole story on the built-in task: reward model, PPO with and
                                 without the KL penalty, plots and runs/demo/report.md (about 5 minutes)
  rlhf demo --quick              the same pipeline at smoke size, in runs/demo-quick (under a minute)
  rlhf sft --model ./my-base --data examples.jsonl --out runs/sft
  rlhf train-reward --out runs/rm
  rlhf train-reward --data prefs.jsonl --model ./my-sft-model --out runs/rm
  rlhf ppo --model ./my-sft-model --reward-model runs/rm --prompts prompts.txt --out runs/ppo
  rlhf ppo --advantage-estimator rloo --samples-per-prompt 4 --batch-size 16 --out runs/rloo
  rlhf dpo --data prefs.jsonl --model ./my-sft-model --out runs/dpo
  rlhf ppo --config runs/ppo/config.yaml --out runs/ppo-again --report-to tensorboard,wandb
  rlhf plot runs/ppo
  rlhf generate runs/ppo --prompt "the acting was"
  rlhf eval runs/ppo             win rate over the starting model, KL, gold: is the run better?

Each command's --help lists its options by group, with examples.
"""

PPO_EXAMPLES = """\
Numbers such as "(ppo-details 19)" point to the checklist in docs/ppo-details.md, which names the
function that implements each detail and the test that checks it.

One --seed fixes a run on one machine: the same command with the same torch build gives the same
numbers step for step. Another CPU, torch build or a GPU sums floating-point numbers in another
order, so runs drift apart after a few steps; the outcome holds, the exact numbers move.

examples:
  rlhf ppo                       the built-in task: 100 steps against its reward model (trained
                                 first if the cache has none), gold score shown live
  rlhf ppo --kl-coef 0 --steps 70 --out runs/no-kl
                                 no KL penalty: the proxy reward climbs while the gold score falls
  rlhf ppo --model ./my-sft-model --reward-model runs/rm --prompts prompts.txt --out runs/ppo
                                 your SFT model, your reward model (the --out folder of
                                 `rlhf train-reward`) and your prompts
  rlhf ppo --model ./my-sft-model --prompts problems.jsonl --advantage-estimator grpo \
      --samples-per-prompt 8 --reward-fn rewards.py:exact_answer
                                 rewards from a Python function (TRL's signature); the records'
                                 other fields (an answer) reach it as columns
  rlhf ppo ... --resume          the same command plus --resume continues a stopped run; with a
                                 larger --steps it extends a finished one
  rlhf plot runs/ppo             reward/KL trade-off and diagnostics figures of a run
"""

REWARD_EXAMPLES = """\
examples:
  rlhf train-reward --out runs/rm
                                 the built-in task: 6,000 pairs sampled from the base model and
                                 labelled by the gold judge
  rlhf train-reward --model ./my-sft-model --data prefs.jsonl --out runs/rm
                                 your SFT model and preference file
  rlhf ppo --model ./my-sft-model --reward-model runs/rm --out runs/ppo
                                 then train a policy against it
"""

# Where each option appears in `--help`: the groups of each command, in order, with a line each.
# A field goes to the first of these groups that the command has: the one(s) OPTION_GROUP names
# for it, those of its name's prefix in OPTION_GROUP_BY_PREFIX, then the group of the config class
# that declares it (or of its nearest base class). So a new option lands in a sensible group
# without editing this file.
PPO_HELP_GROUPS = {
    "inputs": "the models and prompts to start from (default: the built-in task)",
    "outputs": "what is written to --out, and how often",
    "PPO": "the PPO update; (ppo-details N) refers to docs/ppo-details.md",
    "advantages": "the advantage estimator: GAE with a critic, or a critic-free group baseline",
    "rewards": "what scores a response: the reward model, Python reward functions, a reward server; shaping",
    "KL penalty": "the penalty that keeps the policy near the reference",
    "generation": "how responses are sampled during training",
    "LoRA": "train low-rank adapters instead of every weight",
    "rollout engine": "what samples the responses (rlhf's loop or vLLM) and how its mismatch with the trainer is corrected",
    "memory and speed": "micro-batches, precision and sharding: what fits in memory, how fast it runs",
    "run": "seed, device, threads, cache and resuming",
}
REWARD_HELP_GROUPS = {
    "inputs": "the preference data and the model to start from (default: the built-in task)",
    "outputs": "what is written to --out",
    "preference data": "generating pairs on the built-in task (with no --data)",
    "training": "the Bradley-Terry training",
    "run": "seed, device and cache",
}
DPO_HELP_GROUPS = {
    "inputs": "the preference data and the policy to start from (default: the built-in task)",
    "outputs": "what is written to --out",
    "preference data": "generating pairs on the built-in task (with no --data)",
    "training": "the DPO (or IPO) loss and its optimisation",
    "evaluation": "held-out pairs, and gold and KL on fresh samples (built-in task)",
    "run": "seed, device and cache",
}
SFT_HELP_GROUPS = {
    "inputs": "the examples and the model to start from",
    "outputs": "what is written to --out",
    "training": "the cross-entropy loss and its optimisation",
    "LoRA": "train low-rank adapters instead of every weight",
    "run": "seed, device and cache",
}
GENERATE_HELP_GROUPS = {
    "inputs": "the prompts and how they are given to the model",
    "generation": "how responses are sampled",
    "outputs": "what is written, and shown",
    "run": "how many, in what batches, seed, device and cache",
}
EVAL_HELP_GROUPS = {
    "inputs": "what is compared and judged, and the prompts (default: the run's own)",
    "generation": "how responses are sampled",
    "outputs": "what is written to --out",
    "run": "how many prompts, in what batches, seed, device and cache",
}
SERVE_HELP_GROUPS = {
    "inputs": "the reward model to serve, and how texts reach it",
    "run": "device, threads and config file",
    "server": "where it listens (OpenRLHF's protocol at /get_reward) and how it batches",
}
OPTION_GROUP = {
    **dict.fromkeys(
        ("model", "ref_model", "reward_model", "prompts", "data", "max_prompt_tokens",
         "max_length", "chat_template", "eos_token", "trust_remote_code", "prompt_field",
         "chosen_field", "rejected_field", "text_field", "completion_field", "messages_field"),
        "inputs",
    ),
    **dict.fromkeys(
        ("out", "sample_every", "save_every", "keep_checkpoints", "merge_lora", "sample_prompts",
         "sample_tokens", "report_to", "run_name"), "outputs"
    ),
    **dict.fromkeys(("temperature", "top_k", "top_p", "num_samples"), "generation"),
    **dict.fromkeys(("base_model", "baseline"), "inputs"),
    "show": "outputs",
    "response_tokens": ("generation", "preference data"),  # train-reward samples pairs with it
    **dict.fromkeys(("seed", "device", "cache_dir", "resume", "gold"), "run"),
    **dict.fromkeys(
        ("advantage_estimator", "samples_per_prompt", "gamma", "lam", "loss_aggregation",
         "value_model", "whiten_rewards"),
        "advantages",
    ),
    **dict.fromkeys(
        ("rollout_batch_size", "gradient_checkpointing", "compile", "dtype", "fp32_lm_head",
         "shard", "gather_for_sampling"),
        "memory and speed",
    ),
    **dict.fromkeys(("n_pairs", "label_temperature"), "preference data"),
    **dict.fromkeys(
        ("reward_fn", "reward_weights", "reward_model_weight", "reward_url", "reward_url_weight",
         "reward_label_field", "reward_timeout",
         "reward_retries", "reward_batch_size", "reward_shaping", "reward_clip", "par_samples"),
        "rewards",
    ),
}  # fmt: skip
OPTION_GROUP_BY_PREFIX = {
    ("eval_",): ("evaluation",),
    ("kl_", "adaptive_kl", "target_kl"): ("KL penalty",),
    ("lora",): ("LoRA", "PPO", "training"),
    ("rollout_engine", "rollout_correction", "vllm_"): ("rollout engine",),
    ("micro_batch", "grad_accum", "gradient_accumulation"): ("memory and speed", "PPO", "training"),
}
OPTION_GROUP_BY_CLASS = {
    "PPOConfig": "PPO", "PPORunConfig": "run", "RewardConfig": "training", "DPOConfig": "training",
    "SFTConfig": "training",
}  # fmt: skip


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


def option_group(cls: type, name: str, titles) -> str:
    """The `--help` group (one of `titles`) of field `name` of config class `cls`."""
    titles = list(titles)
    named = OPTION_GROUP.get(name, ())
    candidates = [named] if isinstance(named, str) else list(named)
    for prefixes, groups in OPTION_GROUP_BY_PREFIX.items():
        if name.startswith(prefixes):
            candidates += groups
    owner = next(k for k in cls.__mro__ if name in inspect.get_annotations(k))  # declares it
    candidates += [OPTION_GROUP_BY_CLASS.get(k.__name__) for k in owner.__mro__]
    return next((g for g in candidates if g in titles), titles[-1])


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    groups: dict[str, str] | None = None,
    hidden: tuple[str, ...] = (),
) -> None:
    """One `--option` per dataclass field, typed, with the field's default and docstring.

    With `groups` ({title: description}), the options are listed under those headings in
    `--help` (see `option_group`); options of no group go under the last. `hidden` options are
    parsed but not listed: the command can only refuse them, and its refusal says why better
    than a help line could.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    sections = (
        {title: parser.add_argument_group(title, text) for title, text in groups.items()}
        if groups
        else {}
    )
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        target = sections[option_group(cls, f.name, sections)] if sections else parser
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = docs.get(f.name, "")
        if f.name in hidden:
            target.add_argument(flag, type=tp, default=default, help=argparse.SUPPRESS)
        elif tp is bool:
            target.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(tp) is list:  # a repeatable option
            target.add_argument(
                flag, action="append", type=typing.get_args(tp)[0], default=list(default),
                metavar=f.name.upper(), help=f"{help_text} (repeatable)",
            )  # fmt: skip
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            target.add_argument(
                flag, choices=choices, default=default, help=f"{help_text} (default: {default})"
            )
        else:
            shown = "" if default is None else f" (default: {default})"
            target.add_argument(
                flag, type=tp, default=default, metavar=f.name.upper(), help=help_text + shown
            )


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (automatic) or a positive count, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads`, in the command's "run" group where it has one."""
    groups = {g.title: g for g in parser._action_groups}  # argparse keeps no public index
    groups.get("run", parser).add_argument(
        "--threads",
        type=_threads,
        default=0,
        metavar="N",
        help="CPU threads for torch (default: 0, as many cores as are idle when the command "
        "starts; a busy machine gets fewer, since a thread whose core another job holds stalls "
        "every op it takes part in; $OMP_NUM_THREADS, when set, is used as given)",
    )


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    """`--config FILE.yaml`, first in the command's "run" group where it has one (see cli_config)."""
    groups = {g.title: g for g in parser._action_groups}
    groups.get("run", parser).add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="read options from a YAML file (keys are the option names: kl_coef: 0.05); options "
        "on the command line win over it. Every run writes its resolved options to "
        "OUT/config.yaml, so --config runs/x/config.yaml runs it again",
    )


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    values.update(overrides)
    return cls(**values)


def wrap(text: str) -> str:
    """A description for the raw formatter (which keeps the examples' layout), wrapped here."""
    return textwrap.fill(text, width=100, break_on_hyphens=False)
