"""`rlhf eval`: a policy against a baseline (by default its reference) on held-out prompts.

Both sample one response per prompt from the same random draws (`generate.row_draws`), so each
prompt gives a paired comparison. Reported for each side: the reward model's mean score, the
KL to the reference, the gold score (built-in task), response length, EOS rate and distinct-2;
and the policy's win rate over the baseline, P(reward(policy) > reward(baseline)) with ties
counted half, with a 95% Wilson score interval.

Shapes: B batch, P prompt tokens (left-padded), R response tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from ..core import logprobs_from_logits
from ..data import atomic_write_json
from ..errors import ConfigError, InputError
from ..models.forward import autocast, position_ids_from_mask
from ..text_stats import distinct_n
from .generate import (
    PolicySource,
    Samples,
    load_lm,
    load_tokenizer_for,
    prepare_prompts,
    read_prompt_texts,
    resolve_policy,
    response_tokens,
    row_draws,
    run_model,
    sample,
    uses_chat_template,
)
from .sampling_config import EvalConfig

Z95 = 1.959963984540054
"""the standard normal's 97.5% quantile: a two-sided 95% interval"""
EVAL_BUILTIN_PROMPTS = 256
"""held-out prompts on the built-in task (`rlhf dpo --eval-samples`' default)"""


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (Wilson 1927); (0, 1) for n = 0.

    Unlike p +- z sqrt(p (1 - p) / n) it stays inside [0, 1] and does not collapse to a point
    at 0 or n successes. A tie counted as half a success has less variance than a coin flip, so
    with ties the interval is slightly wider than it needs to be (conservative).
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(policy: list[float], baseline: list[float]) -> dict:
    """P(policy > baseline) over paired scores, ties counted half, with its 95% Wilson interval."""
    if len(policy) != len(baseline):
        raise ValueError(f"got {len(policy)} policy scores but {len(baseline)} baseline scores")
    wins = sum(a > b for a, b in zip(policy, baseline))
    ties = sum(a == b for a, b in zip(policy, baseline))
    n = len(policy)
    low, high = wilson_interval(wins + ties / 2, n)
    rate = (wins + ties / 2) / n if n else float("nan")
    return {
        "rate": rate,
        "low": low,
        "high": high,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "interval": "95% Wilson score, ties as half",
    }


def _padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses right-padded to the longest: ids and mask (B, R)."""
    R = max(len(r) for r in rows)
    ids = torch.full((len(rows), R), pad_id, dtype=torch.long)  # (B, R)
    mask = torch.zeros((len(rows), R), dtype=torch.long)  # (B, R)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sequence_kl(
    lm, ref, tokenizer, samples: Samples, temperature: float = 1.0, batch_size: int = 64,
    device=None,
) -> list[float]:  # fmt: skip
    """k1 KL(lm || ref) of each sampled sequence: the sum over its response tokens (EOS included)
    of log lm(token) - log ref(token), in nats, as PPO's `objective/kl` (both at `temperature`)."""
    from ..models.generation import encode_prompts

    out = []
    for s in range(0, len(samples.prompts), batch_size):
        ids, mask, _ = encode_prompts(tokenizer, samples.prompts[s : s + batch_size], device=device)
        response, response_mask = _padded(
            samples.responses[s : s + batch_size], tokenizer.pad_token_id, device
        )  # (B, R) x2
        full = torch.cat([ids, response], 1)  # (B, P+R)
        full_mask = torch.cat([mask, response_mask], 1)  # (B, P+R)
        P = ids.shape[1]
        logps = []
        for model in (lm, ref):
            with autocast(device):
                logits = model(
                    input_ids=full, attention_mask=full_mask,
                    position_ids=position_ids_from_mask(full_mask), use_cache=False,
                ).logits  # (B, P+R, V)  # fmt: skip
            logits = logits[:, P - 1 : -1].float() / temperature  # (B, R, V): token t given < t
            logps.append(logprobs_from_logits(logits, response))  # (B, R)
        out += ((logps[0] - logps[1]) * response_mask).sum(1).tolist()  # (B,)
    return out


@torch.no_grad()
def reward_scores(reward_model, tokenizer, samples: Samples, batch_size: int = 64, device=None):
    """The reward model's score of each prompt + response, read at its EOS (one appended where the
    response has none), on the policy's tokens as PPO scores them; re-encoded as text when the
    reward model has another tokenizer."""
    from ..models.generation import encode_prompts
    from ..models.reward_model import score_responses

    rm_tokenizer = getattr(reward_model, "tokenizer", None) or tokenizer
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        from ..reward.loss import score_texts

        return score_texts(reward_model, rm_tokenizer, samples.prompts, samples.texts).tolist()
    out = []
    for s in range(0, len(samples.prompts), batch_size):
        ids, mask, _ = encode_prompts(tokenizer, samples.prompts[s : s + batch_size], device=device)
        response, _ = _padded(samples.responses[s : s + batch_size], tokenizer.pad_token_id, device)
        with autocast(device):
            scores = score_responses(
                reward_model, ids, mask, response, tokenizer.eos_token_id, tokenizer.pad_token_id
            )  # (B,)
        out += scores.float().tolist()
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def side_metrics(samples: Samples, kl, rewards, gold) -> dict:
    """The means one side of the comparison is judged by (None where not measured)."""
    n = len(samples.texts)
    reward_sd = (
        math.sqrt(sum((r - _mean(rewards)) ** 2 for r in rewards) / max(1, n - 1))
        if rewards
        else None
    )
    return {
        "reward": _mean(rewards) if rewards else None,
        "reward_se": reward_sd / math.sqrt(n) if rewards else None,
        "gold": _mean(gold) if gold else None,
        "kl": _mean(kl) if kl is not None else None,
        "response_tokens": _mean([len(r) for r in samples.responses]),
        "eos_rate": _mean([float(e) for e in samples.ended]),
        "distinct_2": distinct_n(samples.texts, 2),
        "n": n,
    }


def reference_dir(cfg: EvalConfig, source: PolicySource, progress: bool) -> Path | None:
    """--ref-model; else the run's --ref-model, the adapter's base, or the model the run started
    from; None for a plain model folder."""
    from ..models.loading import check_model_dir

    if cfg.ref_model:
        return check_model_dir(cfg.ref_model)
    given = source.run_config.get("ref_model")
    if given:
        if not Path(given).is_dir():
            raise InputError(
                f"{source.run_dir}/config.json: the run's --ref-model {given} is not there; give "
                "the folder with --ref-model"
            )
        return check_model_dir(given)
    if source.base_dir is not None:
        return source.base_dir
    if source.run_config:
        return check_model_dir(run_model(source, cfg.cache_dir, progress))
    return None


def reward_model_dir(cfg: EvalConfig, source: PolicySource, progress: bool) -> Path | None:
    """--reward-model; else the run's, or the built-in task's (trained on first use); else None."""
    from ..models.reward_model import check_reward_model_dir
    from ..rl.inputs import default_reward_model_dir, reward_model_folder

    given = cfg.reward_model or source.run_config.get("reward_model")
    if given:
        if not cfg.reward_model and not Path(given).is_dir():
            raise InputError(
                f"{source.run_dir}/config.json: the run's --reward-model {given} is not there; "
                "give the folder with --reward-model"
            )
        return check_reward_model_dir(reward_model_folder(given))
    if source.builtin and source.task == "arithmetic":
        return None  # scored by its verifier: the gold judge below, no reward model
    if source.builtin:
        from ..rl.config import PPORunConfig
        from ..rl.inputs import builtin_reward_config

        cache = cfg.cache_dir or source.run_config.get("cache_dir")
        # The run's own: the built-in ensemble if it scored with one (--reward-ensemble min, ...).
        run = PPORunConfig(**{
            k: v for k, v in PPORunConfig.saved_options(source.run_config).items()
            if k in ("reward_ensemble", "ensemble_members")
        })  # fmt: skip
        reward_cfg = builtin_reward_config(run)
        return default_reward_model_dir(cache, reward_cfg=reward_cfg, progress=progress) / (
            "reward_model"
        )
    return None


def default_out(cfg: EvalConfig, source: PolicySource) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if source.run_dir is not None:
        return source.run_dir / "eval"
    return Path(f"eval-{source.path.resolve().name}")


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Compare the policy with its baseline and write eval.json and eval.png to the output folder.

    Returns what eval.json holds, plus "out" and "replaced" (the earlier eval.json's win rate,
    or None).
    """
    import json

    from ..models.loading import (
        check_model_dir,
        load_causal_lm,
        load_tokenizer,
        match_vocab,
        pick_device,
    )
    from ..models.reward_ensemble import load_reward_model
    from .eval_report import plot_eval

    cfg.validate()
    start = time.perf_counter()
    device = pick_device(cfg.device)
    # 1. Every folder and file checked before any model is loaded.
    source = resolve_policy(cfg.policy, cfg.base_model, cfg.cache_dir, progress)
    raw, prompts_from = read_prompt_texts(cfg, source, [], EVAL_BUILTIN_PROMPTS, True)
    base_source = (
        resolve_policy(cfg.baseline, None, cfg.cache_dir, progress) if cfg.baseline else None
    )
    ref_dir = reference_dir(cfg, source, progress)
    if ref_dir is None and base_source is None:
        raise ConfigError(
            f"{source.path} is a plain model folder, so its reference is not known: give "
            "--baseline DIR to compare it with, and --ref-model DIR for the KL"
        )
    rm_dir = reward_model_dir(cfg, source, progress)
    gold_on = cfg.gold if cfg.gold is not None else source.builtin
    if gold_on and raw and not isinstance(raw[0], str):
        raise ConfigError(
            "--gold scores text prompts only, and these are conversations; leave it off"
        )
    out = default_out(cfg, source)

    # 2. The models: the policy and the reference share the policy's tokenizer.
    chat = uses_chat_template(cfg, source)
    tokenizer = load_tokenizer_for(source, cfg, chat or not isinstance(raw[0], str))
    where = f"the tokenizer in {source.model_dir}"
    prompts = prepare_prompts(tokenizer, raw, chat, cfg, where)
    policy = load_lm(source, tokenizer, cfg.trust_remote_code).to(device)
    ref = None
    if ref_dir is not None:
        if not _same_vocab(
            load_tokenizer(ref_dir, trust_remote_code=cfg.trust_remote_code), tokenizer
        ):
            raise InputError(
                f"{ref_dir}: the reference's tokenizer is not the policy's, so the KL cannot be "
                "computed token by token; give the model the policy started from with --ref-model"
            )
        ref = load_causal_lm(check_model_dir(ref_dir), trust_remote_code=cfg.trust_remote_code)
        match_vocab(ref, tokenizer, ref_dir)
        ref = ref.to(device)
    if base_source is None:
        baseline, base_tokenizer, base_prompts = ref, tokenizer, prompts
    else:
        base_chat = (
            cfg.chat_template
            if cfg.chat_template is not None
            else uses_chat_template(cfg, base_source)
        )
        base_tokenizer = load_tokenizer_for(base_source, cfg, base_chat)
        if _same_vocab(base_tokenizer, tokenizer):
            base_tokenizer, base_prompts = tokenizer, prompts
        else:
            where = f"the tokenizer in {base_source.model_dir}"
            base_prompts = prepare_prompts(base_tokenizer, raw, base_chat, cfg, where)
        baseline = load_lm(base_source, base_tokenizer, cfg.trust_remote_code).to(device)
    reward_model = None
    if rm_dir is not None:
        reward_model = load_reward_model(rm_dir, trust_remote_code=cfg.trust_remote_code)
        reward_model = reward_model.requires_grad_(False).eval().to(device)

    # 3. Sample both from the same draws, then score.
    R = response_tokens(cfg, source)
    draws = row_draws(len(prompts), R, cfg.seed)
    args = (cfg.temperature, 0, 1.0, cfg.batch_size, device)
    pol = sample(policy, tokenizer, prompts, draws, *args, desc="eval: policy", progress=progress)
    base = sample(baseline, base_tokenizer, base_prompts, draws, *args, desc="eval: baseline",
                  progress=progress)  # fmt: skip
    kl = {"policy": None, "baseline": None}
    if ref is not None:
        kl["policy"] = sequence_kl(
            policy, ref, tokenizer, pol, cfg.temperature, cfg.batch_size, device
        )
        if baseline is ref:
            kl["baseline"] = [0.0] * len(prompts)  # the reference against itself
        elif base_tokenizer is tokenizer:
            kl["baseline"] = sequence_kl(
                baseline, ref, tokenizer, base, cfg.temperature, cfg.batch_size, device
            )
    rewards = {"policy": None, "baseline": None}
    if reward_model is not None:
        rewards["policy"] = reward_scores(reward_model, tokenizer, pol, cfg.batch_size, device)
        rewards["baseline"] = reward_scores(
            reward_model, base_tokenizer, base, cfg.batch_size, device
        )
    gold = {"policy": None, "baseline": None}
    if gold_on:
        from ..task.arithmetic import ArithmeticJudge
        from ..task.gold import GoldJudge

        judge = ArithmeticJudge() if source.task == "arithmetic" else GoldJudge()
        for name, s in (("policy", pol), ("baseline", base)):
            gold[name] = judge.score_batch(raw, s.texts, s.ended)

    # 4. The numbers, the per-prompt scores they come from, and the resolved options.
    sides = {"policy": pol, "baseline": base}
    result = {
        name: side_metrics(sides[name], kl[name], rewards[name], gold[name]) for name in sides
    }
    result["win_rate"] = (
        win_rate(rewards["policy"], rewards["baseline"]) if rewards["policy"] else None
    )
    result["gold_win_rate"] = win_rate(gold["policy"], gold["baseline"]) if gold["policy"] else None
    baseline_name = str(base_source.describe()) if base_source else f"the reference, {ref_dir}"
    result["models"] = {
        "policy": source.describe(), "baseline": baseline_name,
        "baseline_is_reference": base_source is None,
        "reference": str(ref_dir) if ref_dir else None,
        "reward_model": str(rm_dir) if rm_dir else None,
    }  # fmt: skip
    result["prompts_from"] = prompts_from
    resolved = dataclasses.replace(
        cfg, response_tokens=R, chat_template=chat, gold=gold_on, out=str(out),
        num_prompts=len(prompts), ref_model=str(ref_dir) if ref_dir else None,
        reward_model=str(rm_dir) if rm_dir else None,
    )  # fmt: skip
    result["config"] = dataclasses.asdict(resolved)
    per = []
    for i, prompt in enumerate(raw):
        row = {"prompt": prompt}
        for name, s in sides.items():
            row[name] = s.texts[i]
            row[f"{name}_ended"] = s.ended[i]
            row[f"{name}_tokens"] = len(s.responses[i])
            for key, values in (("reward", rewards), ("kl", kl), ("gold", gold)):
                if values[name] is not None:
                    row[f"{name}_{key}"] = values[name][i]
        per.append(row)
    result["per_prompt"] = per
    result["seconds"] = round(time.perf_counter() - start, 1)
    # Sums split over another number of threads (or devices) can flip a sampled token, and then
    # the rest of that response: the numbers repeat exactly only with the same of these.
    result["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                             "device": str(device)}  # fmt: skip

    replaced = None
    if (out / "eval.json").is_file():
        try:
            earlier = json.loads((out / "eval.json").read_text(encoding="utf-8"))
            replaced = {"win_rate": (earlier.get("win_rate") or {}).get("rate")}
        except (OSError, ValueError):
            replaced = {"win_rate": None}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result)
    plot_eval(result, out / "eval.png")
    return {**result, "out": out, "replaced": replaced}
