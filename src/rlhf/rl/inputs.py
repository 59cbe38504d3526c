"""The inputs of a PPO run: prompts, policy, reference, reward model and tokenizer.

`load_run` checks and loads what `rlhf ppo` was given (or the built-in task's defaults);
`default_reward_model_dir` trains the built-in task's reward model on first use and caches it.
`run.train_ppo` runs the training loop on these inputs.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data import read_prompt_records
from ..errors import ConfigError
from ..models.reward_ensemble import RewardEnsemble, ensemble_base, is_ensemble_dir
from ..models.reward_model import RewardModel
from ..models.reward_model import reward_model_folder as reward_model_folder  # re-exported
from .config import PPORunConfig


def default_reward_model_dir(
    cache_dir=None, base_cfg=None, reward_cfg=None, progress: bool = True
) -> Path:
    """The built-in task's reward model folder (holding `reward_model/`), trained on first use.

    `base_cfg` (a `BaseModelConfig`) picks the base model it starts from; `reward_cfg` (a
    `RewardConfig`) its training options. The cache key covers both.
    """
    from ..reward.train import RewardConfig, train_reward
    from ..task.default import BaseModelConfig, base_model_dir, cache_key, default_cache_dir

    base_cfg = base_cfg or BaseModelConfig()
    reward_cfg = reward_cfg or RewardConfig()
    root = default_cache_dir(cache_dir)
    reward_fields = dataclasses.asdict(reward_cfg)
    # Options that do not change the built-in model stay out of the key (it has no --data).
    for name in ("out", "device", "cache_dir", "model", "data", "report_to", "run_name"):
        reward_fields.pop(name)
    for name in ("prompt_field", "chosen_field", "rejected_field"):
        reward_fields.pop(name)
    # Options added since, unset: out of the key, so that earlier caches stay valid.
    for name, unset in (("eos_token", None), ("ensemble", 1), ("ensemble_bootstrap", False)):
        if reward_fields[name] == unset:
            reward_fields.pop(name)
    target = root / cache_key(
        "reward", {"reward": reward_fields, "base": dataclasses.asdict(base_cfg)}
    )
    if (target / "reward_eval.json").is_file():
        return target
    base_dir = base_model_dir(base_cfg, cache_dir=cache_dir, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reward-", dir=root))
    try:
        cfg = dataclasses.replace(
            reward_cfg, out=str(staging), model=str(base_dir), data=None, cache_dir=cache_dir
        )
        train_reward(cfg, progress=progress)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass
class RunInputs:
    """What `rlhf ppo` trains with. `columns` are the prompt records' other fields (one value per
    prompt); `reward_model` is None when the rewards come from functions or a server only."""

    prompts: list[str]
    columns: dict[str, list]
    policy: nn.Module
    ref: nn.Module | None
    reward_model: nn.Module | None
    tokenizer: object
    reward_terms: list = field(default_factory=list)


def load_run_inputs(cfg: PPORunConfig, progress: bool = True):
    """(prompts, policy, reference, reward model, tokenizer), as `load_run` loads them."""
    run = load_run(cfg, progress)
    return run.prompts, run.policy, run.ref, run.reward_model, run.tokenizer


def reward_terms(cfg: PPORunConfig) -> list:
    """The reward terms besides the reward model: --reward-fn functions and the --reward-url
    server, weighted. A server that does not answer now is a `ConfigError`, before any model
    loads."""
    from ..reward.sources import RewardTerm, load_reward_function, parse_weights

    weights = parse_weights(cfg.reward_weights, len(cfg.reward_fn))
    terms = [RewardTerm(load_reward_function(spec), w) for spec, w in zip(cfg.reward_fn, weights)]
    if cfg.reward_url:
        from ..reward.remote import RemoteReward

        server = RemoteReward(
            cfg.reward_url, timeout=cfg.reward_timeout, retries=cfg.reward_retries,
            batch_size=cfg.reward_batch_size, label_field=cfg.reward_label_field,
        )  # fmt: skip
        server.check()
        terms.append(RewardTerm(server, cfg.reward_url_weight))
    return terms


def arithmetic_reward():
    """The arithmetic task's reward: its strict verifier (exactly the right number)."""
    from ..reward.sources import RewardFunction, RewardTerm
    from ..task.arithmetic import strict_reward

    return RewardTerm(
        RewardFunction(strict_reward, name="strict", where="rlhf.task.arithmetic:strict_reward")
    )


def load_run(cfg: PPORunConfig, progress: bool = True) -> RunInputs:
    """Prompts, policy, reference, reward model and tokenizer, validated before any training.

    The prompts come back truncated to --max-prompt-tokens and, with --chat-template, wrapped in
    the tokenizer's chat template. The reward functions are imported first, so that a wrong one
    fails before any model loads; with functions and no --reward-model, no reward model loads.
    """
    from ..models.forward import cast_frozen, compute_dtype
    from ..models.generation import (
        apply_chat_template,
        render_prompt_conversations,
        truncate_prompts,
    )
    from ..models.loading import (
        apply_eos_option,
        check_model_dir,
        load_causal_lm,
        load_tokenizer,
        match_vocab,
        pick_device,
    )
    from ..models.lora import adapter_base, apply_lora
    from ..models.reward_model import check_reward_model_dir

    # Cheap checks first, so that a wrong path fails in a second rather than after loading models.
    device = pick_device(cfg.device)
    terms = reward_terms(cfg)
    if not terms and not cfg.reward_model and cfg.task == "arithmetic":
        terms = [arithmetic_reward()]  # the task's own verifier, not the reviews' reward model
    use_model = bool(cfg.reward_model) or not terms  # the built-in one when nothing else scores
    if cfg.model and not (cfg.reward_model or terms):
        raise ConfigError(
            "--model needs a reward: --reward-model (train one with `rlhf train-reward --model "
            "...`) or --reward-fn"
        )
    prompts, columns = (
        read_prompt_records(cfg.prompts, field=cfg.prompt_field) if cfg.prompts else (None, {})
    )
    for directory in (cfg.model, cfg.ref_model):
        if directory:
            check_model_dir(directory)
    if cfg.reward_model:
        check_reward_model_dir(reward_model_folder(cfg.reward_model))
    check_ensemble_options(cfg, use_model)
    if prompts is None and cfg.task == "arithmetic":
        from ..task.arithmetic import arithmetic_prompts

        records = arithmetic_prompts(4096, seed=cfg.seed, split="train")
        prompts = [r["prompt"] for r in records]
        columns = {"answer": [r["answer"] for r in records]}
    elif prompts is None:
        from ..task import corpus

        prompts = corpus.prompts(4096, seed=cfg.seed, split="train")
    if cfg.model:
        policy_dir = Path(cfg.model)
    elif cfg.task == "arithmetic":
        from ..task.arithmetic_model import arithmetic_model_dir

        policy_dir = arithmetic_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    else:
        from ..task.default import base_model_dir

        policy_dir = base_model_dir(cache_dir=cfg.cache_dir, progress=progress)
    tokenizer = load_tokenizer(policy_dir, trust_remote_code=cfg.trust_remote_code)
    conversations = isinstance(prompts[0], list)
    apply_eos_option(tokenizer, cfg.eos_token, policy_dir, conversations or cfg.chat_template)
    if conversations:
        prompts = render_prompt_conversations(
            tokenizer, prompts, cfg.prompts, f"the tokenizer in {policy_dir}"
        )
    prompts, n_cut = truncate_prompts(tokenizer, prompts, cfg.max_prompt_tokens)
    if n_cut:
        print(
            f"warning: {n_cut} of {len(prompts)} prompts are longer than --max-prompt-tokens "
            f"{cfg.max_prompt_tokens}; they keep their last tokens"
        )
    longest_body = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    if cfg.chat_template and not conversations:  # conversations are rendered already
        prompts = apply_chat_template(tokenizer, prompts, f"the tokenizer in {policy_dir}")
    ref_dir = Path(cfg.ref_model) if cfg.ref_model else policy_dir
    # The default reward model starts from the base model, which is then also the policy.
    models = {"--model": policy_dir, "--ref-model": ref_dir}
    if cfg.reward_model:
        given = reward_model_folder(cfg.reward_model)
        rm_tokenizer = load_tokenizer(given, trust_remote_code=cfg.trust_remote_code)
        if rm_tokenizer.get_vocab() == tokenizer.get_vocab():  # else it re-encodes the text
            # A LoRA adapter or an ensemble of them: the base they adapt.
            base = ensemble_base(given) if is_ensemble_dir(given) else adapter_base(given)
            models["--reward-model"] = base or given
            if rm_tokenizer.eos_token != tokenizer.eos_token:
                # Scores are read at the policy's EOS, a token the reward model never ended on.
                print(
                    f"warning: the reward model in {given} was trained on responses ending in "
                    f"{rm_tokenizer.eos_token}, but this run's end in {tokenizer.eos_token}; "
                    f"give --eos-token '{rm_tokenizer.eos_token}' if that is where they end"
                )
    check_positions(cfg, tokenizer, prompts, longest_body, models)
    # Every model is read in float32; each frozen one then has its matmul weights stored in the
    # compute dtype (`cast_frozen`) before the next is read, so that a bf16 reference computes
    # exactly what the fp32 policy computes at the start (and the peak stays near one fp32 copy
    # beyond the policy's).
    frozen_dtype = compute_dtype(device, cfg.dtype)
    code = cfg.trust_remote_code
    policy = load_causal_lm(policy_dir, trust_remote_code=code)
    match_vocab(policy, tokenizer, policy_dir)
    if cfg.lora_r:
        policy = cast_frozen(apply_lora(policy, cfg, seed=cfg.seed), frozen_dtype)
    if cfg.lora_r and not cfg.ref_model:
        ref = None  # the reference is the policy with its adapters switched off
    else:
        ref_dir = Path(cfg.ref_model) if cfg.ref_model else policy_dir
        ref = load_causal_lm(ref_dir, trust_remote_code=code).requires_grad_(False)
        match_vocab(ref, tokenizer, ref_dir)
        ref = cast_frozen(ref, frozen_dtype).to(device)
    if not use_model:
        return RunInputs(prompts, columns, policy.to(device), ref, None, tokenizer, terms)
    if cfg.reward_model:
        rm_dir = reward_model_folder(cfg.reward_model)
    else:
        reward_cfg = builtin_reward_config(cfg)
        rm_dir = default_reward_model_dir(cfg.cache_dir, reward_cfg=reward_cfg, progress=progress)
        rm_dir = rm_dir / "reward_model"
    # A LoRA reward model trained on the policy's own base joins the policy as a second adapter.
    rm_base = adapter_base(rm_dir)
    share = cfg.lora_r and rm_base is not None and rm_base.resolve() == policy_dir.resolve()
    if share and cfg.value_model == "reward":
        raise ConfigError(
            "--value-model reward needs its own copy of the reward model, but this LoRA reward "
            "model shares the policy's base; use the default --value-model shared"
        )
    if is_ensemble_dir(rm_dir):  # its own base, held once for all its members
        rule = "mean" if cfg.reward_ensemble == "auto" else cfg.reward_ensemble
        reward_model = RewardEnsemble.from_pretrained(
            rm_dir, trust_remote_code=code, rule=rule,
            uncertainty_coef=cfg.uncertainty_coef,
        )  # fmt: skip
    else:
        reward_model = RewardModel.from_pretrained(
            rm_dir, trust_remote_code=code, share_base=policy if share else None
        )
    if not share and cfg.value_model != "reward":  # the critic is copied from it in float32
        reward_model.requires_grad_(False)
        cast_frozen(reward_model.base_model, frozen_dtype, keep_head=False)
    return RunInputs(
        prompts, columns, policy.to(device), ref, reward_model.to(device), tokenizer, terms
    )


def builtin_reward_config(cfg: PPORunConfig):
    """The `RewardConfig` of the built-in reward model that a run without --reward-model scores
    with: the single model, or for --reward-ensemble mean, min or uwo an ensemble of
    --ensemble-members (`default_reward_model_dir` trains and caches each under its own key)."""
    from ..reward.config import RewardConfig

    return RewardConfig(ensemble=1 if cfg.reward_ensemble == "auto" else cfg.ensemble_members)


def check_ensemble_options(cfg: PPORunConfig, use_model: bool) -> None:
    """--reward-ensemble and --uncertainty-coef need an ensemble reward model (a given one, or the
    built-in task's, which is one when a rule is given); an ensemble needs the default
    --value-model and no --shard (one line each, before any model loads)."""
    if cfg.reward_model:
        ensemble = is_ensemble_dir(reward_model_folder(cfg.reward_model))
    else:  # the built-in reviews reward model, when nothing else scores
        ensemble = use_model and cfg.task == "reviews" and cfg.reward_ensemble != "auto"
    if not ensemble and (cfg.reward_ensemble != "auto" or cfg.uncertainty_coef):
        given = f"--reward-ensemble {cfg.reward_ensemble}" if cfg.reward_ensemble != "auto" else ""
        given = given or f"--uncertainty-coef {cfg.uncertainty_coef}"
        which = (
            f"the reward model in {cfg.reward_model} is a single model"
            if cfg.reward_model
            else "the built-in reward model is a single model"
            if use_model
            else "this run has no reward model"
        )
        raise ConfigError(
            f"{given} combines the members of an ensemble, but {which}; train one with "
            "`rlhf train-reward --ensemble N` or leave the option out"
        )
    if ensemble and cfg.value_model == "reward":
        raise ConfigError(
            "--value-model reward starts the critic from one reward model, and this one is an "
            "ensemble; use the default --value-model shared"
        )
    if ensemble and cfg.shard:
        raise ConfigError(
            "--shard does not take an ensemble reward model (its members switch LoRA adapters on "
            "one base); run data-parallel without --shard"
        )


def check_positions(
    cfg: PPORunConfig, tokenizer, prompts: list[str], longest_body: int, models: dict[str, Path]
) -> None:
    """Refuse, before any model is loaded, a run whose sequences would not fit a model's positions.

    The longest prompt (as PPO encodes it: truncated, in the chat template) plus --response-tokens
    plus the EOS that scoring may append must fit the position limit of the policy, the reference
    and the reward model; past it a GPT-2 indexes outside its position table (an IndexError, a
    device assert on CUDA). `longest_body` is the longest prompt before the chat template.
    """
    from ..models.loading import position_limit

    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    need = longest + cfg.response_tokens + 1
    source = cfg.prompts or "the built-in prompts"
    for option, directory in models.items():
        limit = position_limit(directory)
        if limit is None or need <= limit:
            continue
        body = min(cfg.max_prompt_tokens, longest_body) - (need - limit)
        fix = (
            f"lower --max-prompt-tokens to {body} or less"
            if body >= 1
            else f"--response-tokens {cfg.response_tokens} leaves no room for a prompt; lower it"
        )
        raise ConfigError(
            f"{source}: the longest prompt has {longest} tokens, and with --response-tokens "
            f"{cfg.response_tokens} and 1 scoring token that is {need}, more than the {limit} "
            f"positions of {option} {directory}; {fix}"
        )
